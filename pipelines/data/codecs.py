"""The compress stage's encodings, and the one decoder every later stage uses.

An encoded folder holds ``table.parquet`` (zstd Parquet) and, for PCA, ``pca_basis.safetensors``.
How to decode is written in the Parquet schema metadata (``lepton.encoding``), so the table
file describes itself:

- ``float32``: the image-table contract of :mod:`pipelines.io`, lossless.
- ``uint8``: pixels quantized to 256 levels, ``x = offset + scale * q`` with one scale for
  the whole table (pixels share a range); the error is at most ``scale / 2``.
- ``pca``: column ``coefficients`` (n, k) float32 (or uint8 with one scale per component
  when ``quantize_uint8`` is also on); ``x = mean + coefficients @ components``, with
  ``mean`` and ``components`` in the safetensors file.

Parquet options come from :class:`CompressParams`. With both ``byte_stream_split`` and
``use_dictionary`` on, the value column (pixels or coefficients) gets byte-stream-split and
the label column gets the dictionary: Parquet would otherwise pick the dictionary for both,
and byte-stream-split would never apply.

Use :func:`read_compressed` to read an encoded folder back as an :class:`ImageTable`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import CompressParams
from pipelines.errors import DataError
from pipelines.io import (
    CLASSES_KEY,
    IMAGE_COLUMN,
    LABEL_COLUMN,
    SHAPE_KEY,
    ImageTable,
    image_table_to_arrow,
    metadata_shape,
    table_metadata,
)

log = logging.getLogger(__name__)

TABLE_FILE = "table.parquet"
BASIS_FILE = "pca_basis.safetensors"
COEFFICIENTS_COLUMN = "coefficients"
ENCODING_KEY = b"lepton.encoding"


def raw_bytes(table: ImageTable) -> int:
    """Size of the table as plain arrays: float32 pixels plus int64 labels."""
    n = len(table)
    return n * table.pixels_per_image * 4 + n * 8


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


def _list_column(values: np.ndarray):
    import pyarrow as pa

    n, d = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), d)


def encode_table(table: ImageTable, directory: str | Path, p: CompressParams) -> dict[str, Any]:
    """Write ``table`` into ``directory`` with the encoding ``p`` asks for; return its description.

    ``p.pca_components`` larger than the data allows (``min(n, c * h * w)``) is lowered, with
    a warning; the description says how many components were kept.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n, d = len(table), table.pixels_per_image
    flat = table.images.reshape(n, d)
    if p.pca_components == 0:
        if p.quantize_uint8:
            q, scale, offset = quantize_uint8(flat)
            encoding = {"kind": "uint8", "scale": float(scale), "offset": float(offset)}
            arrow = image_table_to_arrow(
                ImageTable(q.reshape(table.images.shape), table.labels, table.num_classes), "uint8"
            )
        else:
            encoding = {"kind": "float32"}
            arrow = image_table_to_arrow(table)
        value_column = IMAGE_COLUMN
    else:
        from safetensors.numpy import save_file

        k = min(p.pca_components, n, d)
        if k < p.pca_components:
            log.warning(
                "pca_components=%d lowered to %d (n=%d, pixels=%d)", p.pca_components, k, n, d
            )
        mean, components = fit_pca(flat, k)
        coefficients = ((flat - mean) @ components.T).astype(np.float32)
        save_file({"mean": mean, "components": components}, str(directory / BASIS_FILE))
        encoding = {"kind": "pca", "components": k, "basis_file": BASIS_FILE}
        if p.quantize_uint8:
            coefficients, scale, offset = quantize_uint8(coefficients, per_column=True)
            encoding["coefficients"] = {
                "kind": "uint8",
                "scale": np.asarray(scale).tolist(),
                "offset": np.asarray(offset).tolist(),
            }
        else:
            encoding["coefficients"] = {"kind": "float32"}
        value_column = COEFFICIENTS_COLUMN
        arrow = pa.table(
            {
                COEFFICIENTS_COLUMN: _list_column(coefficients),
                LABEL_COLUMN: pa.array(table.labels.astype(np.int64)),
            }
        )
    metadata = {**table_metadata(table), ENCODING_KEY: json.dumps(encoding).encode()}
    arrow = arrow.replace_schema_metadata(metadata)
    pq.write_table(arrow, str(directory / TABLE_FILE), **_parquet_options(p, value_column))
    return encoding


def read_compressed(directory: str | Path) -> ImageTable:
    """Decode a folder written by :func:`encode_table` (any encoding) into float32 images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    path = directory / TABLE_FILE
    if not path.is_file():
        raise DataError(str(path), "file not found (has the compress stage run?)")
    try:
        arrow = pq.read_table(str(path))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"not a readable Parquet file ({exc})") from None
    metadata = arrow.schema.metadata or {}
    for key in (SHAPE_KEY, CLASSES_KEY, ENCODING_KEY):
        if key not in metadata:
            raise DataError(str(path), f"schema metadata lacks '{key.decode()}'")
    c, h, w = metadata_shape(metadata)
    encoding = json.loads(metadata[ENCODING_KEY])
    n = arrow.num_rows
    kind = encoding["kind"]
    value_column = COEFFICIENTS_COLUMN if kind == "pca" else IMAGE_COLUMN
    for column in (value_column, LABEL_COLUMN):
        if column not in arrow.column_names:
            raise DataError(str(path), "column missing", field=column)
    labels = arrow.column(LABEL_COLUMN).to_numpy().astype(np.int64)
    if kind in ("float32", "uint8"):
        flat = _list_values(arrow, IMAGE_COLUMN, n)
        if kind == "uint8":
            flat = dequantize_uint8(flat, encoding["scale"], encoding["offset"])
    elif kind == "pca":
        from safetensors.numpy import load_file

        basis_path = directory / encoding["basis_file"]
        if not basis_path.is_file():
            raise DataError(str(basis_path), "PCA basis file not found")
        basis = load_file(str(basis_path))
        coefficients = _list_values(arrow, COEFFICIENTS_COLUMN, n)
        spec = encoding["coefficients"]
        if spec["kind"] == "uint8":
            coefficients = dequantize_uint8(coefficients, spec["scale"], spec["offset"])
        flat = coefficients.astype(np.float32) @ basis["components"] + basis["mean"]
    else:
        raise DataError(str(path), f"unknown encoding '{kind}'", field=ENCODING_KEY.decode())
    images = np.ascontiguousarray(flat, dtype=np.float32).reshape(n, c, h, w)
    return ImageTable(images, labels, int(metadata[CLASSES_KEY]))


def _list_values(arrow, column: str, n: int) -> np.ndarray:
    values = arrow.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values).reshape(n, -1)


def folder_bytes(directory: str | Path) -> int:
    """Bytes on disk of the encoded files in ``directory``."""
    directory = Path(directory)
    return sum(
        (directory / name).stat().st_size
        for name in (TABLE_FILE, BASIS_FILE)
        if (directory / name).is_file()
    )


def reconstruction_error(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """RMSE, max absolute error and relative RMSE ``||decoded - original|| / ||original||``."""
    diff = decoded.astype(np.float64) - original.astype(np.float64)
    rmse = float(np.sqrt(np.mean(diff**2))) if diff.size else 0.0
    norm = float(np.sqrt(np.mean(original.astype(np.float64) ** 2))) if diff.size else 0.0
    return {
        "reconstruction_rmse": rmse,
        "max_abs_error": float(np.abs(diff).max()) if diff.size else 0.0,
        "relative_rmse": rmse / norm if norm > 0 else 0.0,
    }


def compress_table(
    table: ImageTable, directory: str | Path, p: CompressParams
) -> tuple[dict[str, Any], ImageTable, dict[str, float]]:
    """Encode ``table`` into ``directory``, decode it back and measure.

    Returns ``(encoding, decoded table, metrics)`` with metrics ``compression_ratio``
    (raw float32 + int64 bytes over bytes on disk), ``encode_mb_per_s``,
    ``decode_mb_per_s`` (raw MB per second), the reconstruction errors,
    ``file_bytes`` and ``raw_bytes``.
    """
    raw = raw_bytes(table)
    start = time.perf_counter()
    encoding = encode_table(table, directory, p)
    encode_seconds = time.perf_counter() - start
    start = time.perf_counter()
    decoded = read_compressed(directory)
    decode_seconds = time.perf_counter() - start
    if not np.array_equal(decoded.labels, table.labels):
        raise DataError(str(directory), "labels changed in the round trip", field=LABEL_COLUMN)
    size = folder_bytes(directory)
    megabytes = raw / 1e6
    metrics = {
        "compression_ratio": raw / size,
        "encode_mb_per_s": megabytes / max(encode_seconds, 1e-9),
        "decode_mb_per_s": megabytes / max(decode_seconds, 1e-9),
        **reconstruction_error(table.images, decoded.images),
        "file_bytes": float(size),
        "raw_bytes": float(raw),
    }
    return encoding, decoded, metrics
