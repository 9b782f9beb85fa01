"""Loaders, one per ``ingest.source`` kind; each returns a validated :class:`ImageTable`.

Every loader takes ``(params, root)``: relative paths in ``params`` are relative to the
workspace ``root``. Pixels keep their scale (0..16 for digits, 0..255 for images and IDX):
the partition stage normalizes. Images are ``(n, c, h, w)``: grayscale (c = 1) or RGB
(c = 3), whatever the source holds; a source mixing the two, or mixing sizes without
``ingest.resize``, is refused naming the file. Flat feature rows become images of
``ingest.image_shape`` (``[h, w]``, or ``[h, w, c]`` channel-last), or grayscale squares of
the square root of their width. ``ingest.resize`` resizes every image to one size.
``num_classes`` is ``ingest.num_classes`` when set, else what the file says (the contract's
schema metadata, the number of class folders), else the largest label + 1.

Sources:
- ``digits``: scikit-learn's bundled 8x8 digits (no network).
- ``parquet``: our image-table contract (list column ``image``), or a wide table: the
  label column ``ingest.label_column`` plus one numeric column per pixel.
- ``csv``: a header line, the label column and one column per pixel.
- ``npz``: arrays ``x`` (n, h, w), (n, h, w, c), (n, c, h, w) or (n, d) and ``y`` (n,).
- ``idx``: MNIST IDX image and label files, optionally gzipped.
- ``images``: a folder with one sub-folder per class (classes are the sorted folder names)
  of PNG / JPEG / ... images, all grayscale or all colour (read as RGB), of one size unless
  ``ingest.resize`` is set.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines.config import IngestParams
from pipelines.data.resize import resize_image, resize_images
from pipelines.data.source_files import (
    IMAGE_SUFFIXES,
    class_folders,
    image_files,
    resolve,
)
from pipelines.data.validate import (
    channels_first,
    check_file,
    first_true,
    labels_to_int64,
    numeric_column_values,
    rows_to_images,
    validate_columns,
    validate_labels,
    validate_pixels,
    validate_table,
)
from pipelines.errors import DataError
from pipelines.io import (
    CLASSES_KEY,
    IMAGE_COLUMN,
    SHAPE_KEY,
    ImageTable,
    TableLayout,
    TableStream,
    batch_rows_for,
    metadata_shape,
    open_parquet_file,
)

MAX_CLASSES = 100_000  # the bound on ingest.num_classes
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _class_count(
    labels: np.ndarray, p: IngestParams, file: str, num_classes: int | None, field: str
) -> int:
    """``ingest.num_classes``, else what the file says, else the largest label + 1."""
    classes = p.num_classes or num_classes
    if classes is None:
        classes = max(int(labels.max()) + 1, 0)
        if classes > MAX_CLASSES:
            raise DataError(
                file,
                f"largest label {classes - 1} implies {classes} classes; set ingest.num_classes",
                field=field,
                row=int(labels.argmax()),
            )
    return int(classes)


def _finish(
    images: np.ndarray,
    labels: np.ndarray,
    p: IngestParams,
    file: str,
    num_classes: int | None = None,
    fields: tuple[str, str] = ("image", "label"),
) -> ImageTable:
    if len(images) != len(labels):
        raise DataError(file, f"{len(images)} images but {len(labels)} labels", field=fields[1])
    if len(labels) == 0:
        raise DataError(file, "no rows (the table is empty)")
    classes = _class_count(labels, p, file, num_classes, fields[1])
    table = ImageTable(np.ascontiguousarray(images, dtype=np.float32), labels, classes)
    validate_table(table, file, p.num_classes, image_field=fields[0], label_field=fields[1])
    return table


def load_digits(p: IngestParams, root: Path) -> ImageTable:
    """scikit-learn's bundled digits: 1797 images of 8x8 pixels in 0..16, ten classes."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    return _finish(data.images, data.target.astype(np.int64), p, "sklearn digits", 10)


def load_parquet(p: IngestParams, root: Path) -> ImageTable:
    """A Parquet file: the image-table contract, or a label column plus pixel columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = check_file(resolve(p.path, root))
    file = str(path)
    try:
        arrow = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            file, f"not a readable Parquet file (truncated or corrupt?): {exc}"
        ) from None
    if arrow.num_rows == 0:
        raise DataError(file, "no rows (the table is empty)")
    if IMAGE_COLUMN in arrow.column_names and _is_list(arrow.schema.field(IMAGE_COLUMN).type):
        return _contract_parquet(arrow, p, file)
    features, labels = validate_columns(arrow, file, p.label_column)
    return _finish(rows_to_images(features, p.image_shape, file), labels, p, file)


def _is_list(kind) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )


def _contract_labels(column, p: IngestParams, file: str) -> np.ndarray:
    """The label column of a contract table as int64, checked."""
    values = numeric_column_values(column, file, p.label_column)
    return labels_to_int64(values, file, field=p.label_column)


def _contract_shape(metadata: dict, width: int, file: str) -> tuple[int, int, int]:
    """``(c, h, w)`` from the contract's metadata; it must match the rows' ``width``."""
    c, h, w = metadata_shape(metadata)  # the contract's own layout: channel-first
    if c * h * w != width:
        raise DataError(
            file,
            f"schema metadata says {c}x{h}x{w} images, rows have {width} values",
            field=IMAGE_COLUMN,
        )
    return c, h, w


def _check_no_missing_image(column, file: str, first_row: int = 0) -> None:
    """A null entry of an image list column is a DataError with its row."""
    import pyarrow.compute as pc

    if column.null_count:
        row = first_true(pc.is_null(column).to_numpy(zero_copy_only=False))
        raise DataError(file, "missing image", field=IMAGE_COLUMN, row=first_row + row)


def _image_values(column, width: int, file: str, first_row: int = 0) -> np.ndarray:
    """A list column of images as float32 rows ``(n, width)``; a missing image or pixel is a
    DataError with its row (``first_row``: the row of the column's first entry)."""
    import pyarrow.compute as pc

    _check_no_missing_image(column, file, first_row)
    values = column.flatten()
    if values.null_count:
        index = first_true(pc.is_null(values).to_numpy(zero_copy_only=False))
        raise DataError(
            file,
            f"missing value at pixel {index % width}",
            field=IMAGE_COLUMN,
            row=first_row + index // width,
        )
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)


def _contract_parquet(arrow, p: IngestParams, file: str) -> ImageTable:
    import pyarrow.compute as pc

    if p.label_column not in arrow.column_names:
        raise DataError(file, "label column missing; set ingest.label_column", field=p.label_column)
    labels = _contract_labels(arrow.column(p.label_column), p, file)
    column = arrow.column(IMAGE_COLUMN).combine_chunks()
    _check_no_missing_image(column, file)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    row = first_true(lengths != lengths[0])
    if row is not None:
        raise DataError(
            file,
            f"row has {lengths[row]} values, row 0 has {lengths[0]} (rows of different lengths)",
            field=IMAGE_COLUMN,
            row=row,
        )
    width = int(lengths[0])
    features = _image_values(column, width, file)
    metadata = arrow.schema.metadata or {}
    classes = int(metadata[CLASSES_KEY]) if CLASSES_KEY in metadata else None
    if p.image_shape is None and SHAPE_KEY in metadata:
        c, h, w = _contract_shape(metadata, width, file)
        return _finish(features.reshape(-1, c, h, w), labels, p, file, classes)
    return _finish(rows_to_images(features, p.image_shape, file), labels, p, file, classes)


def load_csv(p: IngestParams, root: Path) -> ImageTable:
    """A CSV file with a header line: the label column plus one column per pixel."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    path = check_file(resolve(p.path, root))
    file = str(path)
    ragged: list = []

    def on_invalid_row(row) -> str:
        ragged.append(row)
        return "skip"

    try:
        arrow = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(use_threads=False),
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid_row),
        )
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise DataError(file, f"not a readable CSV file: {exc}") from None
    if ragged:
        bad = ragged[0]
        line = bad.number
        raise DataError(
            file,
            f"expected {bad.expected_columns} columns, got {bad.actual_columns}"
            + (f" (line {line})" if line is not None else "")
            + " (rows of different lengths)",
            row=line - 2 if line is not None else None,
        )
    if arrow.num_rows == 0:
        raise DataError(file, "no rows (only a header line?)")
    features, labels = validate_columns(arrow, file, p.label_column, line_offset=2)
    return _finish(rows_to_images(features, p.image_shape, file), labels, p, file)


def load_npz(p: IngestParams, root: Path) -> ImageTable:
    """An ``.npz`` file with ``x`` (n, h, w) or (n, d) and integer labels ``y`` (n,)."""
    import zipfile

    path = check_file(resolve(p.path, root))
    file = str(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise DataError(
                    file, f"array missing (arrays: {', '.join(archive.files)})", field=missing[0]
                )
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(file, f"not a readable .npz file: {exc}") from None
    if x.dtype.kind not in "biuf":
        raise DataError(file, f"must hold numbers, got dtype {x.dtype}", field="x")
    if x.ndim == 2:
        images = rows_to_images(x.astype(np.float32), p.image_shape, file, field="x")
    elif x.ndim in (3, 4):
        images = channels_first(x.astype(np.float32), file, field="x")
        if p.image_shape is not None and tuple(p.image_shape[:2]) != images.shape[2:]:
            raise DataError(
                file,
                f"images are {list(images.shape[2:])}, ingest.image_shape says "
                f"{list(p.image_shape)}",
                field="x",
            )
    else:
        raise DataError(
            file,
            f"must be (n, h, w), (n, h, w, c), (n, c, h, w) or (n, d), got shape {list(x.shape)}",
            field="x",
        )
    labels = labels_to_int64(y, file, field="y")
    return _finish(images, labels, p, file, fields=("x", "y"))


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped); the header is checked against the file size."""
    file = str(check_file(path))
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(file, f"not a readable gzip file: {exc}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPES:
        raise DataError(file, "not an IDX file (bad magic number)", field="header")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(file, f"IDX header is cut short ({ndim} dimensions)", field="header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            file,
            f"header says {list(dims)} ({expected} bytes of data), the file holds "
            f"{len(raw) - header} (truncated or padded)",
            field="header",
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def load_idx(p: IngestParams, root: Path) -> ImageTable:
    """MNIST IDX files: images ``path`` (n, h, w) and labels ``labels_path`` (n,)."""
    images_path = resolve(p.path, root)
    labels_path = resolve(p.labels_path, root)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim == 2:
        images = rows_to_images(images.astype(np.float32), p.image_shape, str(images_path))
    elif images.ndim != 3:
        raise DataError(
            str(images_path), f"images must be (n, h, w), got {list(images.shape)}", field="header"
        )
    if labels.ndim != 1:
        raise DataError(
            str(labels_path), f"labels must be (n,), got {list(labels.shape)}", field="header"
        )
    if len(labels) != len(images):
        raise DataError(
            str(labels_path),
            f"{len(labels)} labels but {images_path.name} holds {len(images)} images",
            field="count",
        )
    return _finish(images, labels_to_int64(labels, str(labels_path)), p, str(images_path))


GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def read_image_file(path: Path, resize: tuple[int, int] | None) -> np.ndarray:
    """One image file as float32 ``(c, h, w)``: c = 1 for a grayscale file (``L``, ``I``,
    ...), 3 for any colour one (RGB, palette, CMYK, ...; alpha is dropped); resized when
    ``resize`` is given."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in GRAYSCALE_MODES:
            array = np.asarray(image.convert("F"), dtype=np.float32)[None]
        else:
            array = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return resize_image(array, resize) if resize is not None else array


def load_images(p: IngestParams, root: Path) -> ImageTable:
    """A class-per-folder tree of images: all grayscale or all colour, one size (or resized)."""
    from PIL import Image

    folder = resolve(p.path, root)
    if not folder.is_dir():
        raise DataError(str(folder), "folder not found (expected one sub-folder per class)")
    classes = class_folders(folder)
    if not classes:
        raise DataError(str(folder), "no class sub-folders")
    files = image_files(folder)
    if not files:
        raise DataError(str(folder), f"no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    pixels, first = [], None
    for row, (path, _) in enumerate(files):
        try:
            array = read_image_file(path, p.resize)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(str(path), f"unreadable image: {exc}", field="image", row=row) from None
        if first is None:
            first = (path, array.shape)
        elif array.shape[0] != first[1][0]:
            kinds = {1: "grayscale", 3: "colour"}
            raise DataError(
                str(path),
                f"image is {kinds[array.shape[0]]}, {first[0].name} is {kinds[first[1][0]]}; "
                "all images must be grayscale or all colour",
                field="image",
                row=row,
            )
        elif array.shape != first[1]:
            raise DataError(
                str(path),
                f"image is {array.shape[2]}x{array.shape[1]} (width x height), "
                f"{first[0].name} is {first[1][2]}x{first[1][1]}; all must be the same size "
                "(or set ingest.resize)",
                field="image",
                row=row,
            )
        pixels.append(array)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return _finish(np.stack(pixels), labels, p, str(folder), len(classes))


LOADERS: dict[str, Callable[[IngestParams, Path], ImageTable]] = {
    "digits": load_digits,
    "parquet": load_parquet,
    "csv": load_csv,
    "npz": load_npz,
    "idx": load_idx,
    "images": load_images,
}


def open_source(p: IngestParams, root: Path) -> TableStream:
    """The source as a validated stream, resized to ``ingest.resize``.

    A Parquet file in the image-table contract (fixed-size list column) streams in batches,
    each checked as it is read, so memory stays bounded whatever its size; every other
    source is loaded (and checked) whole, then streamed as one batch. The layout's
    ``pixel_type`` is ``uint8`` when every pixel is a whole number in 0..255 (stored so,
    losslessly), else ``float``.
    """
    if p.source == "parquet":
        stream = _stream_contract_parquet(p, root)
        if stream is not None:
            return stream
    return TableStream.from_table(load_source(p, root))


def _stream_contract_parquet(p: IngestParams, root: Path) -> TableStream | None:
    """A contract Parquet file (fixed-size list images, shape metadata) as a checked stream;
    None for any other Parquet layout, which :func:`load_parquet` reads whole."""
    import pyarrow as pa

    path = check_file(resolve(p.path, root))
    file = str(path)
    try:
        handle = open_parquet_file(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            file, f"not a readable Parquet file (truncated or corrupt?): {exc}"
        ) from None
    schema = handle.schema_arrow
    metadata = schema.metadata or {}
    if (
        IMAGE_COLUMN not in schema.names
        or not pa.types.is_fixed_size_list(schema.field(IMAGE_COLUMN).type)
        or SHAPE_KEY not in metadata
        or p.image_shape is not None
    ):
        return None
    if handle.metadata.num_rows == 0:
        raise DataError(file, "no rows (the table is empty)")
    if p.label_column not in schema.names:
        raise DataError(file, "label column missing; set ingest.label_column", field=p.label_column)
    width = schema.field(IMAGE_COLUMN).type.list_size
    c, h, w = _contract_shape(metadata, width, file)
    labels = _contract_labels(handle.read(columns=[p.label_column]).column(p.label_column), p, file)
    file_classes = int(metadata[CLASSES_KEY]) if CLASSES_KEY in metadata else None
    classes = _class_count(labels, p, file, file_classes, p.label_column)
    validate_labels(labels, classes, file, p.num_classes, p.label_column)
    value_type = schema.field(IMAGE_COLUMN).type.value_type
    stored_uint8 = pa.types.is_uint8(value_type) and p.resize is None
    shape = p.resize if p.resize is not None else (h, w)
    layout = TableLayout(
        len(labels), c, tuple(shape), classes, labels, "uint8" if stored_uint8 else "float"
    )

    def batches():
        first = 0
        for batch in handle.iter_batches(batch_size=batch_rows_for(width), columns=[IMAGE_COLUMN]):
            pixels = _image_values(batch.column(0), width, file, first).reshape(-1, c, h, w)
            validate_pixels(pixels, file, IMAGE_COLUMN, first)
            first += batch.num_rows
            yield resize_images(pixels, p.resize) if p.resize is not None else pixels

    return TableStream(layout, batches)


def load_source(p: IngestParams, root: Path) -> ImageTable:
    """Load and validate the source ``ingest.source`` names, resized to ``ingest.resize``."""
    table = LOADERS[p.source](p, root)
    if p.resize is None:
        return table
    return ImageTable(resize_images(table.images, p.resize), table.labels, table.num_classes)
