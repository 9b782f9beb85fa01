"""Files: image tables in Parquet, safetensors weights, JSON, and atomic output writes.

Data contract for image tables: column ``image`` is a fixed-size list (float32 or uint8)
holding one flattened image per row, channel-first (``c * h * w`` values), column ``label``
is int64 in ``[0, num_classes)``, and the schema metadata carries ``lepton.image_shape``
(JSON ``[h, w]``), ``lepton.channels`` (1 grayscale, 3 RGB; a table without it is
grayscale) and ``lepton.num_classes``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.atomic import Staging, atomic_outputs  # noqa: F401 (the stages' import)
from pipelines.errors import DataError

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
SHAPE_KEY = b"lepton.image_shape"
CLASSES_KEY = b"lepton.num_classes"
CHANNELS_KEY = b"lepton.channels"


@dataclass(frozen=True)
class ImageTable:
    """Images ``(n, c, h, w)`` and labels ``(n,)`` int64 with the number of classes.

    ``c`` is 1 (grayscale) or 3 (RGB). Images given as ``(n, h, w)`` are grayscale: a
    channel axis is added (a view, no copy).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.ndim == 3:
            object.__setattr__(self, "images", self.images[:, None])
        if self.images.ndim != 4:
            raise ValueError(f"images must be (n, c, h, w), got shape {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        """Channels of every image: 1 grayscale, 3 RGB."""
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def pixels_per_image(self) -> int:
        """Values per image: ``c * h * w``."""
        c, h, w = self.images.shape[1:]
        return int(c * h * w)

    def subset(self, index: np.ndarray) -> ImageTable:
        """Rows ``index`` as a new table."""
        return ImageTable(self.images[index], self.labels[index], self.num_classes)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ContentHasher:
    """:func:`content_sha256` fed batch by batch: the same digest without the whole table in
    memory (only its labels, 8 bytes a row)."""

    def __init__(self, rows: int, channels: int, image_shape: tuple[int, int], num_classes: int):
        h, w = image_shape
        # grayscale hashes as before channels were stored: data versions keep their digests
        shape = [rows, h, w] if channels == 1 else [rows, channels, h, w]
        self._digest = hashlib.sha256(json.dumps([shape, num_classes]).encode())
        self._labels: list[np.ndarray] = []

    def update(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Add the next rows (images as stored in memory, any dtype; hashed as float32)."""
        self._digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
        self._labels.append(np.ascontiguousarray(labels, dtype=np.int64))

    def hexdigest(self) -> str:
        """The digest of every row added so far."""
        digest = self._digest.copy()
        for labels in self._labels:
            digest.update(labels.tobytes())
        return digest.hexdigest()


def content_sha256(table: ImageTable) -> str:
    """Hash of the table's content (shape, pixels, labels), independent of the file encoding."""
    hasher = ContentHasher(len(table), table.channels, table.image_shape, table.num_classes)
    hasher.update(table.images, table.labels)
    return hasher.hexdigest()


def integer_pixels_fit_uint8(images: np.ndarray) -> bool:
    """Whether every pixel is a whole number in 0..255, so uint8 storage is lossless."""
    if images.dtype == np.uint8:
        return True
    return bool(
        images.size
        and images.min() >= 0
        and images.max() <= 255
        and np.array_equal(images, np.rint(images))
    )


def _arrow_rows(images: np.ndarray, labels: np.ndarray, pixel_dtype: str, metadata: dict):
    import pyarrow as pa

    n = len(images)
    flat = np.ascontiguousarray(images.reshape(n, int(np.prod(images.shape[1:])))).astype(
        pixel_dtype, copy=False
    )
    image_col = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    schema = pa.schema(
        [pa.field(IMAGE_COLUMN, image_col.type), pa.field(LABEL_COLUMN, pa.int64())],
        metadata=metadata,
    )
    return pa.Table.from_arrays(
        [image_col, pa.array(np.asarray(labels, dtype=np.int64))], schema=schema
    )


def table_metadata(table: ImageTable | TableLayout) -> dict[bytes, bytes]:
    """The contract's schema metadata of a table or layout: shape, channels, classes."""
    return _contract_metadata(table.channels, table.image_shape, table.num_classes)


def _contract_metadata(
    channels: int, image_shape: tuple[int, int], num_classes: int
) -> dict[bytes, bytes]:
    return {
        SHAPE_KEY: json.dumps([int(v) for v in image_shape]).encode(),
        CHANNELS_KEY: str(int(channels)).encode(),
        CLASSES_KEY: str(int(num_classes)).encode(),
    }


def metadata_shape(metadata: dict[bytes, bytes]) -> tuple[int, int, int]:
    """``(c, h, w)`` from a table's schema metadata (no channels key = grayscale)."""
    h, w = json.loads(metadata[SHAPE_KEY])
    return int(metadata.get(CHANNELS_KEY, b"1")), int(h), int(w)


class ImageTableWriter:
    """Writes a contract table to Parquet batch by batch (zstd by default), so a table larger
    than memory can be written; use as a context manager, or call :meth:`close`.

    ``parquet_options`` go to pyarrow's ``ParquetWriter``; ``row_group_size`` caps the rows
    of a row group (a batch of fewer rows makes a smaller one).
    """

    def __init__(
        self,
        path: str | Path,
        channels: int,
        image_shape: tuple[int, int],
        num_classes: int,
        pixel_dtype: str = "float32",
        extra_metadata: dict | None = None,
        **parquet_options: Any,
    ):
        import pyarrow.parquet as pq

        self.pixel_dtype = pixel_dtype
        self.rows = 0
        self._row_group_size = parquet_options.pop("row_group_size", None)
        parquet_options.setdefault("compression", "zstd")
        self._metadata = _contract_metadata(channels, image_shape, num_classes)
        for key, value in (extra_metadata or {}).items():
            self._metadata[key.encode()] = json.dumps(value).encode()
        empty = np.zeros((0, channels, *image_shape), dtype=pixel_dtype)
        schema = _arrow_rows(empty, np.zeros(0, np.int64), pixel_dtype, self._metadata).schema
        self._writer = pq.ParquetWriter(str(path), schema, **parquet_options)

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Append rows: images ``(b, c, h, w)`` and labels ``(b,)``."""
        if len(labels) == 0:
            return
        arrow = _arrow_rows(images, labels, self.pixel_dtype, self._metadata)
        self._writer.write_table(arrow, row_group_size=self._row_group_size)
        self.rows += len(labels)

    def close(self) -> None:
        """Finish the file (its footer); the file is incomplete until then."""
        self._writer.close()

    def __enter__(self) -> ImageTableWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_image_table(table: ImageTable, path: str | Path, **parquet_options: Any) -> None:
    """Write ``table`` as Parquet (zstd by default): :class:`ImageTableWriter` with one batch.

    ``pixel_dtype`` (default float32) and ``extra_metadata`` go to the writer, the other
    options to pyarrow."""
    pixel_dtype = parquet_options.pop("pixel_dtype", "float32")
    extra_metadata = parquet_options.pop("extra_metadata", None)
    with ImageTableWriter(
        path,
        table.channels,
        table.image_shape,
        table.num_classes,
        pixel_dtype,
        extra_metadata,
        **parquet_options,
    ) as writer:
        writer.write(table.images, table.labels)


@dataclass(frozen=True)
class TableLayout:
    """What a contract table holds, read without its pixels: rows, shape, classes, labels."""

    rows: int
    channels: int
    image_shape: tuple[int, int]
    num_classes: int
    labels: np.ndarray
    pixel_type: str  # the stored pixel type, e.g. "uint8" or "float"

    @property
    def pixels_per_image(self) -> int:
        """Values per image: ``c * h * w``."""
        return self.channels * self.image_shape[0] * self.image_shape[1]


def open_parquet_file(path: str | Path):
    """A pyarrow ``ParquetFile`` for reading batch by batch in bounded memory.

    ``pre_buffer=False``: with pre-buffering (pyarrow's default) the reader keeps every
    column chunk it has read, and a pass over a 1M-row table held 400 MB more at its end.
    """
    import pyarrow.parquet as pq

    return pq.ParquetFile(str(path), pre_buffer=False)


def _open_parquet(path: Path):
    import pyarrow as pa

    if not path.is_file():
        raise DataError(str(path), "file not found")
    try:
        return open_parquet_file(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"not a readable Parquet file ({exc})") from None


def read_table_layout(path: str | Path, value_column: str = IMAGE_COLUMN) -> TableLayout:
    """The layout of a contract table: its metadata and its label column only
    (``value_column`` is the column holding each row's values: the images, or the PCA
    coefficients of an encoded table)."""
    path = Path(path)
    handle = _open_parquet(path)
    schema = handle.schema_arrow
    metadata = schema.metadata or {}
    for key in (SHAPE_KEY, CLASSES_KEY):
        if key not in metadata:
            raise DataError(str(path), f"schema metadata lacks '{key.decode()}'")
    for column in (value_column, LABEL_COLUMN):
        if column not in schema.names:
            raise DataError(str(path), "column missing", field=column)
    c, h, w = metadata_shape(metadata)
    labels = handle.read(columns=[LABEL_COLUMN]).column(LABEL_COLUMN).to_numpy()
    return TableLayout(
        rows=handle.metadata.num_rows,
        channels=c,
        image_shape=(h, w),
        num_classes=int(metadata[CLASSES_KEY]),
        labels=np.asarray(labels, dtype=np.int64),
        pixel_type="uint8"
        if str(schema.field(value_column).type.value_type) == "uint8"
        else "float",
    )


def batch_rows_for(pixels_per_image: int, batch_bytes: int = 32 << 20) -> int:
    """Rows of a streaming batch that holds about ``batch_bytes`` of float32 pixels."""
    return max(1, batch_bytes // (4 * max(pixels_per_image, 1)))


def iter_image_batches(path: str | Path, batch_rows: int | None = None) -> Iterator[np.ndarray]:
    """Images ``(b, c, h, w)`` float32 of a contract table, ``batch_rows`` at a time (default:
    about 32 MB), in row order; memory stays bounded by the batch."""
    return _pixel_batches(Path(path), read_table_layout(path), batch_rows)


def _pixel_batches(path: Path, layout: TableLayout, batch_rows: int | None) -> Iterator[np.ndarray]:
    c, (h, w) = layout.channels, layout.image_shape
    rows = batch_rows or batch_rows_for(layout.pixels_per_image)
    for batch in _open_parquet(path).iter_batches(batch_size=rows, columns=[IMAGE_COLUMN]):
        values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
        yield np.asarray(values).astype(np.float32).reshape(batch.num_rows, c, h, w)


@dataclass(frozen=True)
class TableStream:
    """A table read batch by batch: its layout, and a function that starts a fresh pass over
    its images ``(b, c, h, w)`` float32 in row order (labels are in the layout)."""

    layout: TableLayout
    batches: Callable[[], Iterator[np.ndarray]]

    @classmethod
    def from_table(cls, table: ImageTable) -> TableStream:
        """An in-memory table as a stream of one batch (``pixel_type`` uint8 when every pixel
        is a whole number in 0..255)."""
        layout = TableLayout(
            rows=len(table),
            channels=table.channels,
            image_shape=table.image_shape,
            num_classes=table.num_classes,
            labels=table.labels,
            pixel_type="uint8" if integer_pixels_fit_uint8(table.images) else "float",
        )
        return cls(layout, lambda: iter([table.images.astype(np.float32, copy=False)]))

    @classmethod
    def from_file(cls, path: str | Path, batch_rows: int | None = None) -> TableStream:
        """A contract Parquet file, ``batch_rows`` rows a batch (default about 32 MB)."""
        layout = read_table_layout(path)
        return cls(layout, lambda: _pixel_batches(Path(path), layout, batch_rows))

    def batches_with_labels(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(first row, images, labels)`` of each batch of a fresh pass."""
        start = 0
        for images in self.batches():
            stop = start + len(images)
            yield start, images, self.layout.labels[start:stop]
            start = stop

    def content_sha256(self) -> str:
        """:func:`content_sha256` of the stream's table, in one pass."""
        layout = self.layout
        hasher = ContentHasher(layout.rows, layout.channels, layout.image_shape, layout.num_classes)
        for _, images, labels in self.batches_with_labels():
            hasher.update(images, labels)
        return hasher.hexdigest()


def read_within_budget(path: str | Path, budget_mb: float) -> ImageTable | TableStream:
    """The contract table at ``path`` in memory, or as a stream when its float32 pixels exceed
    ``budget_mb`` (``common.memory_budget_mb``)."""
    layout = read_table_layout(path)
    if layout.rows * layout.pixels_per_image * 4 > budget_mb * 1e6:
        return TableStream(layout, lambda: _pixel_batches(Path(path), layout, None))
    return _read_with_layout(Path(path), layout)


def read_image_table(path: str | Path) -> ImageTable:
    """Read a Parquet file written by :func:`write_image_table` or :class:`ImageTableWriter`;
    errors name file and field."""
    return _read_with_layout(Path(path), read_table_layout(path))


def _read_with_layout(path: Path, layout: TableLayout) -> ImageTable:
    batches = list(_pixel_batches(path, layout, None))
    c, (h, w) = layout.channels, layout.image_shape
    images = np.concatenate(batches) if batches else np.zeros((0, c, h, w), np.float32)
    return ImageTable(images, layout.labels, layout.num_classes)


def client_shard_paths(partitions: str | Path) -> list[Path]:
    """The client shards ``clients/client_*.parquet`` of a partitions folder, in name order;
    none is a DataError naming the folder."""
    folder = Path(partitions) / "clients"
    shards = sorted(folder.glob("client_*.parquet"))
    if not shards:
        raise DataError(str(folder), "no client shards (has partition run?)")
    return shards


def read_client_shards(partitions: str | Path) -> list[tuple[Path, ImageTable]]:
    """Every client shard of a partitions folder (:func:`client_shard_paths`) in memory,
    with its path."""
    return [(path, read_image_table(path)) for path in client_shard_paths(partitions)]


def read_client_shards_within_budget(
    partitions: str | Path, budget_mb: float
) -> list[tuple[Path, ImageTable | TableStream]]:
    """The client shards in memory, or every one as a :class:`TableStream` when their
    float32 pixels together exceed ``budget_mb`` (``common.memory_budget_mb``)."""
    paths = client_shard_paths(partitions)
    layouts = [read_table_layout(path) for path in paths]
    if sum(lay.rows * lay.pixels_per_image * 4 for lay in layouts) > budget_mb * 1e6:
        return [
            (path, TableStream(lay, functools.partial(_pixel_batches, path, lay, None)))
            for path, lay in zip(paths, layouts, strict=True)
        ]
    return [(path, _read_with_layout(path, lay)) for path, lay in zip(paths, layouts, strict=True)]


def table_rows(table: ImageTable | TableStream) -> int:
    """Rows of a table in memory or of a stream."""
    return table.layout.rows if isinstance(table, TableStream) else len(table)


def batches_with_labels(table: ImageTable | TableStream) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(images, labels)`` of a table in memory (one batch) or of each batch of a stream."""
    if isinstance(table, TableStream):
        for _, images, labels in table.batches_with_labels():
            yield images, labels
    else:
        yield table.images, table.labels


def union_sha256(tables: list[ImageTable | TableStream], num_classes: int) -> str:
    """:func:`content_sha256` of the rows of ``tables`` in order (as one table of
    ``num_classes`` classes), each read once; streams never whole in memory."""
    first = tables[0].layout if isinstance(tables[0], TableStream) else tables[0]
    hasher = ContentHasher(
        sum(table_rows(t) for t in tables), first.channels, first.image_shape, num_classes
    )
    for table in tables:
        for images, labels in batches_with_labels(table):
            hasher.update(images, labels)
    return hasher.hexdigest()


def concat_tables(tables: list[ImageTable], num_classes: int | None = None) -> ImageTable:
    """Rows of all ``tables`` in order, as one table (classes: the largest, or as given)."""
    return ImageTable(
        np.concatenate([t.images for t in tables]),
        np.concatenate([t.labels for t in tables]),
        num_classes if num_classes is not None else max(t.num_classes for t in tables),
    )


def read_json(path: str | Path) -> Any:
    """Load a JSON file; a missing or broken file raises DataError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(str(path), "file not found (has the upstream stage run?)") from None
    except json.JSONDecodeError as exc:
        raise DataError(str(path), f"not valid JSON ({exc})") from None


def write_json(path: str | Path, payload: Any) -> None:
    """Write JSON with sorted keys and a trailing newline (diff-friendly)."""
    Path(path).write_text(
        json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n"
    )


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: never half-written."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temp.write_text(text)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_weights(
    module, directory: str | Path, config: dict[str, Any], name: str = "model"
) -> None:
    """Save a torch module as ``<name>.safetensors`` plus ``<name>.json`` (its config)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", config)


def load_weights(directory: str | Path, name: str = "model") -> tuple[dict, dict[str, Any]]:
    """Load ``(state_dict, config)`` saved by :func:`save_weights` (safetensors, no pickle)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / f"{name}.safetensors"
    if not weights.is_file():
        raise DataError(str(weights), "weights file not found (has the upstream stage run?)")
    return load_file(str(weights)), read_json(directory / f"{name}.json")


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the workspace root."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def compressed(self) -> Path:
        return self.root / "data" / "compressed"

    @property
    def partitions(self) -> Path:
        return self.root / "data" / "partitions"

    def model_dir(self, stage: str) -> Path:
        """Output folder of a model stage: ``models/<stage>``."""
        return self.root / "models" / stage

    @property
    def evaluate(self) -> Path:
        return self.root / "reports" / "evaluate"

    def report(self, stage: str) -> Path:
        """The stage's metrics file (``reports/metrics.json`` for evaluate)."""
        name = "metrics" if stage == "evaluate" else stage
        return self.root / "reports" / f"{name}.json"
