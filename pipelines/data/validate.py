"""Checks on ingested data: every failure is a DataError naming the file, the field and the row.

Rows count from 0 over the data records (a CSV header is not a row); CSV problems also give
the line of the file. The checks run in two places: :func:`validate_columns` on the raw
columns of a CSV or wide Parquet file (missing values, non-numeric cells, the label column),
and :func:`validate_table` on every loaded table (non-empty, shapes, finite pixels, labels
in ``[0, num_classes)``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipelines.errors import DataError
from pipelines.io import IMAGE_COLUMN, LABEL_COLUMN, ImageTable

SUPPORTED_CHANNELS = (1, 3)  # grayscale, RGB


def check_file(path: str | Path) -> Path:
    """Return ``path`` if it is a non-empty file; else a DataError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise DataError(str(path), "is a folder, expected a file")
    if not path.is_file():
        raise DataError(str(path), "file not found")
    if path.stat().st_size == 0:
        raise DataError(str(path), "file is empty (0 bytes)")
    return path


def first_true(mask: np.ndarray) -> int | None:
    """Index of the first True in a 1-D mask, or None."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def labels_to_int64(values: np.ndarray, file: str, field: str = LABEL_COLUMN) -> np.ndarray:
    """Labels as int64; float labels must be whole numbers (the first that is not is reported)."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise DataError(file, f"labels must be 1-D, got shape {values.shape}", field=field)
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    if values.dtype.kind != "f":
        raise DataError(file, f"labels must be integers, got dtype {values.dtype}", field=field)
    bad = first_true(~np.isfinite(values))
    if bad is not None:
        raise DataError(file, "missing label (NaN)", field=field, row=bad)
    bad = first_true(values != np.round(values))
    if bad is not None:
        raise DataError(
            file, f"label {values[bad].item()!r} is not an integer", field=field, row=bad
        )
    return values.astype(np.int64)


def validate_columns(
    arrow_table, file: str, label_column: str, line_offset: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Check a wide table (a label column plus one numeric column per feature).

    Returns ``(features (n, d) float32, labels (n,) int64)``. ``line_offset`` turns a row
    into a file line for the message (CSV: 2, the header being line 1).
    """
    names = arrow_table.column_names
    if label_column not in names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise DataError(
            file,
            f"label column missing (columns: {shown}); set ingest.label_column",
            field=label_column,
        )
    feature_names = [n for n in names if n != label_column]
    if not feature_names:
        raise DataError(file, "no feature columns besides the label column", field=label_column)

    columns = [
        numeric_column_values(arrow_table.column(name), file, name, line_offset)
        for name in [label_column, *feature_names]
    ]
    labels = labels_to_int64(columns[0], file, field=label_column)
    features = np.stack([np.asarray(c, dtype=np.float32) for c in columns[1:]], axis=1)
    return features, labels


def numeric_column_values(
    column, file: str, name: str, line_offset: int | None = None
) -> np.ndarray:
    """A numeric Arrow column as numpy; missing, non-numeric or infinite cells raise DataError.

    Numbers written as text (a CSV column with a stray word) are parsed, and the first cell
    that is not a number is reported.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    def where(row: int) -> str:
        return f" (line {row + line_offset})" if line_offset is not None else ""

    if column.null_count:
        row = first_true(pc.is_null(column).to_numpy(zero_copy_only=False))
        raise DataError(file, f"missing value{where(row)}", field=name, row=row)
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        row = _first_non_number(column.to_pylist())
        if row is not None:
            raise DataError(
                file,
                f"value {column[row].as_py()!r} is not a number{where(row)}",
                field=name,
                row=row,
            )
        column = pc.cast(column, pa.float64())
    elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise DataError(file, f"column is not numeric (type {kind})", field=name)
    values = np.asarray(column.to_numpy(zero_copy_only=False))
    if values.dtype.kind == "f":
        row = first_true(np.isnan(values))
        if row is not None:
            raise DataError(file, f"missing value (NaN){where(row)}", field=name, row=row)
        row = first_true(~np.isfinite(values))
        if row is not None:
            raise DataError(file, f"value is infinite{where(row)}", field=name, row=row)
    return values


def _first_non_number(values: list) -> int | None:
    for row, value in enumerate(values):
        try:
            if math.isnan(float(value)):
                return row
        except (TypeError, ValueError):
            return row
    return None


def rows_to_images(
    features: np.ndarray,
    image_shape: tuple[int, ...] | None,
    file: str,
    field: str = IMAGE_COLUMN,
) -> np.ndarray:
    """Reshape flat rows ``(n, d)`` into images ``(n, c, h, w)``.

    The shape is ``image_shape`` when given (``[h, w]`` grayscale, or ``[h, w, c]`` for rows
    that hold colour pixels channel-last), else a grayscale square of the row's width; a
    width that fits neither is a DataError.
    """
    if features.ndim != 2:
        raise DataError(file, f"expected rows of features (2-D), got {features.shape}", field=field)
    n, width = features.shape
    if image_shape is not None:
        h, w, c = (*(int(v) for v in image_shape), 1)[:3]
        if h * w * c != width:
            raise DataError(
                file,
                f"ingest.image_shape {list(image_shape)} needs {h * w * c} values per row, "
                f"rows have {width}",
                field=field,
            )
    else:
        side = math.isqrt(width)
        if side * side != width:
            raise DataError(
                file,
                f"rows have {width} values, not a square number; set ingest.image_shape",
                field=field,
            )
        h = w = side
        c = 1
    images = features.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images, dtype=np.float32)


def channels_first(images: np.ndarray, file: str, field: str) -> np.ndarray:
    """An image array as ``(n, c, h, w)``: ``(n, h, w)`` is grayscale, ``(n, h, w, c)`` with
    ``c`` in 1, 3 is channel-last (numpy / PIL order), ``(n, c, h, w)`` stays."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[3] in SUPPORTED_CHANNELS:
        return images.transpose(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1] in SUPPORTED_CHANNELS:
        return images
    raise DataError(
        file,
        f"images must be (n, h, w), (n, h, w, c) or (n, c, h, w) with c = 1 or 3, "
        f"got shape {list(images.shape)}",
        field=field,
    )


def validate_table(
    table: ImageTable,
    file: str,
    num_classes: int | None = None,
    *,
    image_field: str = IMAGE_COLUMN,
    label_field: str = LABEL_COLUMN,
) -> None:
    """Check a loaded table against the data contract; raise DataError on the first problem.

    ``num_classes`` is the expected number of classes (``ingest.num_classes``); None uses
    the table's own. ``image_field`` / ``label_field`` name the fields in messages as the
    source calls them (``x`` / ``y`` in an NPZ file).
    """
    images, labels = table.images, table.labels
    if len(labels) == 0:
        raise DataError(file, "no rows (the table is empty)")
    if images.ndim != 4 or min(images.shape[2:]) < 1:
        raise DataError(
            file, f"images must be (n, c, h, w), got {list(images.shape)}", field=image_field
        )
    if images.shape[1] not in SUPPORTED_CHANNELS:
        raise DataError(
            file,
            f"images have {images.shape[1]} channels; 1 (grayscale) or 3 (RGB) are supported",
            field=image_field,
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            file, f"{len(images)} images but labels of shape {labels.shape}", field=label_field
        )
    if images.dtype.kind != "f":
        raise DataError(file, f"pixels must be float, got {images.dtype}", field=image_field)
    validate_pixels(images, file, image_field)
    validate_labels(labels, table.num_classes, file, num_classes, label_field)


def validate_pixels(images: np.ndarray, file: str, field: str, first_row: int = 0) -> None:
    """Every pixel of a batch ``(b, ...)`` is finite; else a DataError with the row
    (``first_row`` is the batch's first row in the file)."""
    finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    row = first_true(~finite)
    if row is not None:
        flat = images[row].reshape(-1)
        pixel = first_true(~np.isfinite(flat))
        raise DataError(
            file,
            f"pixel {pixel} is {flat[pixel]} (values must be finite numbers)",
            field=field,
            row=first_row + row,
        )


def validate_labels(
    labels: np.ndarray, classes: int, file: str, num_classes: int | None, field: str
) -> None:
    """Labels are integers in ``[0, classes)`` with at least two classes; ``num_classes`` is
    ``ingest.num_classes`` (named in the message when set)."""
    if labels.dtype.kind not in "iu":
        raise DataError(file, f"labels must be integers, got {labels.dtype}", field=field)
    bad = first_true((labels < 0) | (labels >= classes))
    if bad is not None:
        raise DataError(
            file,
            f"label {int(labels[bad])} is outside [0, {classes})"
            + (f" (ingest.num_classes is {num_classes})" if num_classes is not None else ""),
            field=field,
            row=bad,
        )
    if classes < 2:
        raise DataError(file, f"labels hold {classes} class; need at least 2", field=field)
