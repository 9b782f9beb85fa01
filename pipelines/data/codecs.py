"""The compress stage's encodings, and the one decoder every later stage uses.

An encoded folder holds ``table.parquet`` (zstd Parquet) and, for PCA, ``pca_basis.safetensors``.
How to decode is written in the Parquet schema metadata (``lepton.encoding``), so the table
file describes itself:

- ``lossless``: the image-table contract of :mod:`pipelines.io`, pixels stored as the raw
  table stores them (uint8 for whole numbers in 0..255, else float32). Files from before
  this name say ``float32``; they decode the same way.
- ``uint8``: pixels quantized to 256 levels, ``x = offset + scale * q`` with one scale for
  the whole table (pixels share a range); the error is at most ``scale / 2``.
- ``pca``: column ``coefficients`` (n, k) float32 (or uint8 with one scale per component
  when ``quantize_uint8`` is also on); ``x = mean + coefficients @ components``, with
  ``mean`` and ``components`` in the safetensors file. The basis is fitted on at most
  :data:`PCA_FIT_ROWS` rows (evenly spaced when the table has more).

Every encoding streams: the table is read, encoded, written and decoded back in batches of
about 32 MB, so a table larger than memory compresses in bounded memory.

Parquet options come from :class:`CompressParams`. With both ``byte_stream_split`` and
``use_dictionary`` on, the value column (pixels or coefficients) gets byte-stream-split and
the label column gets the dictionary: Parquet would otherwise pick the dictionary for both,
and byte-stream-split would never apply.

Use :func:`read_compressed` to read an encoded folder back as an :class:`ImageTable`, or
:func:`compressed_stream` to read it batch by batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import CompressParams
from pipelines.errors import DataError
from pipelines.io import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    ImageTable,
    ImageTableWriter,
    TableLayout,
    TableStream,
    batch_rows_for,
    open_parquet_file,
    read_table_layout,
    table_metadata,
)

log = logging.getLogger(__name__)

TABLE_FILE = "table.parquet"
BASIS_FILE = "pca_basis.safetensors"
COEFFICIENTS_COLUMN = "coefficients"
ENCODING_KEY = b"lepton.encoding"
PCA_FIT_ROWS = 20_000  # rows the PCA basis is fitted on, at most
LOSSLESS_KINDS = ("lossless", "float32")


def raw_bytes(layout: TableLayout | ImageTable) -> int:
    """Size of the table as plain arrays: float32 pixels plus int64 labels."""
    rows = layout.rows if isinstance(layout, TableLayout) else len(layout)
    return rows * layout.pixels_per_image * 4 + rows * 8


def quantize_uint8(values: np.ndarray, per_column: bool = False) -> tuple[np.ndarray, Any, Any]:
    """Affine 8-bit quantization of ``values`` (n, d): returns ``(q, scale, offset)``.

    One scale for the whole array, or one per column (``per_column``). Decoding with
    :func:`dequantize_uint8` is off by at most ``scale / 2``.
    """
    values = np.asarray(values, dtype=np.float64)
    axis = 0 if per_column else None
    low, high = values.min(axis=axis), values.max(axis=axis)
    scale = np.where(high > low, (high - low) / 255.0, 1.0)
    q = np.clip(np.rint((values - low) / scale), 0, 255).astype(np.uint8)
    return q, scale, low


def dequantize_uint8(q: np.ndarray, scale: Any, offset: Any) -> np.ndarray:
    """Inverse of :func:`quantize_uint8` as float32."""
    return (np.asarray(offset) + np.asarray(scale) * q.astype(np.float64)).astype(np.float32)


def fit_pca(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and the top ``k`` principal directions ``(k, d)`` of rows ``flat``."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=k, svd_solver="auto", random_state=0).fit(flat.astype(np.float64))
    # contiguous: safetensors writes the raw buffer, whatever the strides
    mean = np.ascontiguousarray(pca.mean_, dtype=np.float32)
    return mean, np.ascontiguousarray(pca.components_, dtype=np.float32)


def _parquet_options(p: CompressParams, value_column: str) -> dict[str, Any]:
    values = f"{value_column}.list.element"
    options: dict[str, Any] = {
        "compression": "zstd",
        "compression_level": p.compression_level,
        "row_group_size": p.row_group_size,
        "use_dictionary": p.use_dictionary,
        "use_byte_stream_split": [values] if p.byte_stream_split else False,
    }
    if p.byte_stream_split and p.use_dictionary:
        options["use_dictionary"] = [LABEL_COLUMN]
    return options


def _coefficient_writer(path: Path, k: int, dtype: str, metadata: dict, options: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    value = pa.uint8() if dtype == "uint8" else pa.float32()
    schema = pa.schema(
        [
            pa.field(COEFFICIENTS_COLUMN, pa.list_(value, k)),
            pa.field(LABEL_COLUMN, pa.int64()),
        ],
        metadata=metadata,
    )
    return pq.ParquetWriter(str(path), schema, **options)


def _write_coefficients(writer, coefficients: np.ndarray, labels: np.ndarray, rows) -> None:
    import pyarrow as pa

    k = coefficients.shape[1]
    column = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(coefficients).reshape(-1)), k
    )
    table = pa.Table.from_arrays([column, pa.array(labels.astype(np.int64))], schema=writer.schema)
    writer.write_table(table, row_group_size=rows)


def pixel_range(stream: TableStream) -> tuple[float, float]:
    """Smallest and largest pixel of a stream (one pass)."""
    low, high = np.inf, -np.inf
    for images in stream.batches():
        low, high = min(low, float(images.min())), max(high, float(images.max()))
    return low, high


def _fit_rows(rows: int) -> np.ndarray:
    """Rows the PCA basis is fitted on: all, or PCA_FIT_ROWS evenly spaced ones."""
    if rows <= PCA_FIT_ROWS:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, PCA_FIT_ROWS).round().astype(np.int64))


def _sample_rows(stream: TableStream, rows: np.ndarray) -> np.ndarray:
    parts = []
    for start, images, _ in stream.batches_with_labels():
        pick = rows[(rows >= start) & (rows < start + len(images))] - start
        parts.append(images.reshape(len(images), -1)[pick])
    return np.concatenate(parts)


def encode_stream(stream: TableStream, directory: str | Path, p: CompressParams) -> dict[str, Any]:
    """Write ``stream`` into ``directory`` with the encoding ``p`` asks for, batch by batch;
    return its description.

    ``p.pca_components`` larger than the data allows (``min(n, c * h * w)``) is lowered, with
    a warning; the description says how many components were kept.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = stream.layout
    n, d = layout.rows, layout.pixels_per_image
    path = directory / TABLE_FILE
    if p.pca_components == 0:
        options = _parquet_options(p, IMAGE_COLUMN)
        if p.quantize_uint8:
            low, high = pixel_range(stream)
            scale = (high - low) / 255.0 if high > low else 1.0
            encoding = {"kind": "uint8", "scale": float(scale), "offset": float(low)}
            dtype = "uint8"
        else:
            encoding = {"kind": "lossless"}
            dtype = "uint8" if layout.pixel_type == "uint8" else "float32"
        with ImageTableWriter(
            path,
            layout.channels,
            layout.image_shape,
            layout.num_classes,
            dtype,
            {ENCODING_KEY.decode(): encoding},
            **options,
        ) as writer:
            for _, images, labels in stream.batches_with_labels():
                if p.quantize_uint8:
                    images = np.clip(np.rint((images.astype(np.float64) - low) / scale), 0, 255)
                writer.write(images, labels)
        return encoding

    from safetensors.numpy import save_file

    k = min(p.pca_components, n, d)
    if k < p.pca_components:
        log.warning("pca_components=%d lowered to %d (n=%d, pixels=%d)", p.pca_components, k, n, d)
    mean, components = fit_pca(_sample_rows(stream, _fit_rows(n)), k)
    save_file({"mean": mean, "components": components}, str(directory / BASIS_FILE))

    def coefficients() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _, images, labels in stream.batches_with_labels():
            yield (
                ((images.reshape(len(images), d) - mean) @ components.T).astype(np.float32),
                labels,
            )

    encoding: dict[str, Any] = {"kind": "pca", "components": k, "basis_file": BASIS_FILE}
    if p.quantize_uint8:
        low, high = np.full(k, np.inf), np.full(k, -np.inf)
        for values, _ in coefficients():
            low, high = np.minimum(low, values.min(0)), np.maximum(high, values.max(0))
        scale = np.where(high > low, (high - low) / 255.0, 1.0)
        encoding["coefficients"] = {
            "kind": "uint8",
            "scale": scale.tolist(),
            "offset": low.tolist(),
        }
    else:
        encoding["coefficients"] = {"kind": "float32"}
    metadata = {
        **table_metadata(layout),
        ENCODING_KEY: json.dumps(encoding).encode(),
    }
    options = _parquet_options(p, COEFFICIENTS_COLUMN)
    row_group_size = options.pop("row_group_size")
    dtype = "uint8" if p.quantize_uint8 else "float32"
    writer = _coefficient_writer(path, k, dtype, metadata, options)
    try:
        for values, labels in coefficients():
            if p.quantize_uint8:
                values = np.clip(np.rint((values.astype(np.float64) - low) / scale), 0, 255)
            _write_coefficients(writer, values.astype(dtype), labels, row_group_size)
    finally:
        writer.close()
    return encoding


def encode_table(table: ImageTable, directory: str | Path, p: CompressParams) -> dict[str, Any]:
    """:func:`encode_stream` of an in-memory table."""
    return encode_stream(TableStream.from_table(table), directory, p)


def compressed_stream(directory: str | Path, batch_rows: int | None = None) -> TableStream:
    """An encoded folder (any encoding) read back batch by batch as float32 images."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    path = directory / TABLE_FILE
    if not path.is_file():
        raise DataError(str(path), "file not found (has the compress stage run?)")
    metadata = pq.read_schema(str(path)).metadata or {}
    if ENCODING_KEY not in metadata:
        raise DataError(str(path), f"schema metadata lacks '{ENCODING_KEY.decode()}'")
    encoding = json.loads(metadata[ENCODING_KEY])
    kind = encoding["kind"]
    if kind not in (*LOSSLESS_KINDS, "uint8", "pca"):
        raise DataError(str(path), f"unknown encoding '{kind}'", field=ENCODING_KEY.decode())
    value_column = COEFFICIENTS_COLUMN if kind == "pca" else IMAGE_COLUMN
    layout = read_table_layout(path, value_column)
    c, (h, w) = layout.channels, layout.image_shape
    decode = _decoder(directory, encoding)
    rows = batch_rows or batch_rows_for(layout.pixels_per_image)

    def batches() -> Iterator[np.ndarray]:
        handle = open_parquet_file(path)
        for batch in handle.iter_batches(batch_size=rows, columns=[value_column]):
            values = np.asarray(batch.column(0).flatten().to_numpy(zero_copy_only=False))
            flat = decode(values.reshape(batch.num_rows, -1))
            yield np.ascontiguousarray(flat, dtype=np.float32).reshape(batch.num_rows, c, h, w)

    return TableStream(layout, batches)


def _decoder(directory: Path, encoding: dict[str, Any]):
    """values read from the file ``(b, k)`` → flat float32 pixels ``(b, c * h * w)``."""
    kind = encoding["kind"]
    if kind in LOSSLESS_KINDS:
        return lambda values: values.astype(np.float32)
    if kind == "uint8":
        return lambda values: dequantize_uint8(values, encoding["scale"], encoding["offset"])
    from safetensors.numpy import load_file

    basis_path = directory / encoding["basis_file"]
    if not basis_path.is_file():
        raise DataError(str(basis_path), "PCA basis file not found")
    basis = load_file(str(basis_path))
    spec = encoding["coefficients"]

    def decode_pca(values: np.ndarray) -> np.ndarray:
        if spec["kind"] == "uint8":
            values = dequantize_uint8(values, spec["scale"], spec["offset"])
        return values.astype(np.float32) @ basis["components"] + basis["mean"]

    return decode_pca


def read_compressed(directory: str | Path) -> ImageTable:
    """Decode a folder written by :func:`encode_stream` (any encoding) into float32 images."""
    stream = compressed_stream(directory)
    layout = stream.layout
    parts = list(stream.batches())
    c, (h, w) = layout.channels, layout.image_shape
    images = np.concatenate(parts) if parts else np.zeros((0, c, h, w), np.float32)
    return ImageTable(images, layout.labels, layout.num_classes)


def folder_bytes(directory: str | Path) -> int:
    """Bytes on disk of the encoded files in ``directory``."""
    directory = Path(directory)
    return sum(
        (directory / name).stat().st_size
        for name in (TABLE_FILE, BASIS_FILE)
        if (directory / name).is_file()
    )


class ErrorMeter:
    """Reconstruction error accumulated batch by batch: RMSE, max absolute error and relative
    RMSE ``||decoded - original|| / ||original||``."""

    def __init__(self) -> None:
        self.squared = self.original_squared = self.max_abs = 0.0
        self.count = 0

    def update(self, original: np.ndarray, decoded: np.ndarray) -> None:
        """Add one batch of original and decoded pixels."""
        diff = decoded.astype(np.float64) - original.astype(np.float64)
        self.squared += float(np.sum(diff**2))
        self.original_squared += float(np.sum(original.astype(np.float64) ** 2))
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()) if diff.size else 0.0)
        self.count += diff.size

    def metrics(self) -> dict[str, float]:
        """``reconstruction_rmse``, ``max_abs_error``, ``relative_rmse``."""
        rmse = float(np.sqrt(self.squared / self.count)) if self.count else 0.0
        norm = float(np.sqrt(self.original_squared / self.count)) if self.count else 0.0
        return {
            "reconstruction_rmse": rmse,
            "max_abs_error": self.max_abs,
            "relative_rmse": rmse / norm if norm > 0 else 0.0,
        }


def reconstruction_error(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """RMSE, max absolute error and relative RMSE of one pair of arrays."""
    meter = ErrorMeter()
    meter.update(original, decoded)
    return meter.metrics()


class _RowReader:
    """Rows of a batch iterator taken in other batch sizes; times the iterator's work."""

    def __init__(self, batches: Iterator[np.ndarray]):
        self._batches = batches
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self.seconds = 0.0

    def take(self, rows: int) -> np.ndarray:
        """The next ``rows`` rows."""
        while self._buffered < rows:
            start = time.perf_counter()
            batch = next(self._batches, None)
            self.seconds += time.perf_counter() - start
            if batch is None:
                raise DataError("decoded table", f"ended {rows - self._buffered} rows early")
            self._buffer.append(batch)
            self._buffered += len(batch)
        joined = self._buffer[0] if len(self._buffer) == 1 else np.concatenate(self._buffer)
        head, rest = joined[:rows], joined[rows:]
        self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)
        return head


def compress_stream(
    stream: TableStream, directory: str | Path, p: CompressParams
) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    """Encode ``stream`` into ``directory``, decode it back batch by batch and measure.

    Returns ``(encoding, metrics, decoded)``: metrics ``compression_ratio`` (raw float32 +
    int64 bytes over bytes on disk), ``encode_mb_per_s``, ``decode_mb_per_s`` (raw MB per
    second), the reconstruction errors, ``file_bytes`` and ``raw_bytes``; ``decoded`` holds
    the decoded pixel range and content sha256, and the source's pixel range (measured in the
    same comparison pass).
    """
    from pipelines.io import ContentHasher

    layout = stream.layout
    raw = raw_bytes(layout)
    start = time.perf_counter()
    encoding = encode_stream(stream, directory, p)
    encode_seconds = time.perf_counter() - start
    decoded_stream = compressed_stream(directory)
    if not np.array_equal(decoded_stream.layout.labels, layout.labels):
        raise DataError(str(directory), "labels changed in the round trip", field=LABEL_COLUMN)
    meter = ErrorMeter()
    hasher = ContentHasher(layout.rows, layout.channels, layout.image_shape, layout.num_classes)
    low, high = np.inf, -np.inf  # decoded pixels
    source_low, source_high = np.inf, -np.inf
    decoded_rows = _RowReader(decoded_stream.batches())
    for _, original, labels in stream.batches_with_labels():
        decoded = decoded_rows.take(len(original))
        meter.update(original, decoded)
        hasher.update(decoded, labels)
        low, high = min(low, float(decoded.min())), max(high, float(decoded.max()))
        source_low = min(source_low, float(original.min()))
        source_high = max(source_high, float(original.max()))
    decode_seconds = decoded_rows.seconds
    size = folder_bytes(directory)
    megabytes = raw / 1e6
    metrics = {
        "compression_ratio": raw / size,
        "encode_mb_per_s": megabytes / max(encode_seconds, 1e-9),
        "decode_mb_per_s": megabytes / max(decode_seconds, 1e-9),
        **meter.metrics(),
        "file_bytes": float(size),
        "raw_bytes": float(raw),
    }
    summary = {
        "pixel_min": low,
        "pixel_max": high,
        "source_pixel_min": source_low,
        "source_pixel_max": source_high,
        "content_sha256": hasher.hexdigest(),
    }
    return encoding, metrics, summary


def compress_table(
    table: ImageTable, directory: str | Path, p: CompressParams
) -> tuple[dict[str, Any], ImageTable, dict[str, float]]:
    """:func:`compress_stream` of an in-memory table; returns ``(encoding, decoded table,
    metrics)``."""
    encoding, metrics, _ = compress_stream(TableStream.from_table(table), directory, p)
    return encoding, read_compressed(directory), metrics


def normalize_pixels(images: np.ndarray, low: float, high: float) -> tuple[np.ndarray, float]:
    """Map ``[min(low, 0), high]`` onto [0, 1], clipping; return images and the clipped share."""
    low = min(low, 0.0)
    span = high - low if high > low else 1.0
    scaled = (images.astype(np.float64) - low) / span
    clipped = float(np.mean((scaled < 0) | (scaled > 1))) if scaled.size else 0.0
    return np.clip(scaled, 0.0, 1.0).astype(np.float32), clipped
