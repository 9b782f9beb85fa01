"""Compress the raw table: zstd Parquet, optionally uint8-quantized or PCA-reduced.

Outputs in ``data/compressed``: ``table.parquet`` (plus ``pca_basis.safetensors`` for PCA)
and ``manifest.json`` (the encoding, the source's content sha256 and pixel range, the
decoded pixel range and the measured errors). Later stages read it back with
:func:`pipelines.data.codecs.read_compressed`, whatever the encoding. Pixels keep their
scale here; the partition stage normalizes them with the pixel range in the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipelines.config import CompressParams, Params
from pipelines.data.codecs import LOSSLESS_KINDS, TABLE_FILE, compress_stream
from pipelines.io import Paths, TableStream, atomic_outputs, read_json, write_json
from pipelines.tracking import StageTracker

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


def compress(
    stream: TableStream, directory: Path, p: CompressParams
) -> tuple[dict[str, Any], dict[str, float]]:
    """Encode ``stream`` into ``directory`` batch by batch; return the manifest fields and the
    metrics."""
    encoding, measured, decoded = compress_stream(stream, directory, p)
    layout = stream.layout
    manifest = {
        "encoding": encoding,
        "lossy": encoding["kind"] not in LOSSLESS_KINDS,
        "rows": layout.rows,
        "image_shape": list(layout.image_shape),
        "channels": layout.channels,
        "num_classes": layout.num_classes,
        "pixel_min": decoded["source_pixel_min"],
        "pixel_max": decoded["source_pixel_max"],
        "decoded_pixel_min": decoded["pixel_min"],
        "decoded_pixel_max": decoded["pixel_max"],
        "decoded_content_sha256": decoded["content_sha256"],
        "reconstruction_rmse": measured["reconstruction_rmse"],
        "max_abs_error": measured["max_abs_error"],
        "parquet": p.model_dump(
            include={"compression_level", "byte_stream_split", "use_dictionary", "row_group_size"}
        ),
    }
    return manifest, measured


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Compress ``data/raw`` into ``data/compressed``; return ratio, MB/s and errors."""
    p = params.compress
    raw_manifest = read_json(paths.raw / "manifest.json")
    stream = TableStream.from_file(paths.raw / "table.parquet")
    out, report = paths.compressed, paths.report("compress")
    with atomic_outputs(dirs=[out], files=[report]) as staged:
        manifest, metrics = compress(stream, staged.path(out), p)
        manifest["source_content_sha256"] = raw_manifest["content_sha256"]
        write_json(staged.path(out) / MANIFEST_FILE, manifest)
        write_json(staged.path(report), metrics)
    log.info(
        "%s: ratio %.2f, encode %.0f MB/s, decode %.0f MB/s, rmse %.4g",
        manifest["encoding"]["kind"],
        metrics["compression_ratio"],
        metrics["encode_mb_per_s"],
        metrics["decode_mb_per_s"],
        metrics["reconstruction_rmse"],
    )
    tracker.log_metrics(metrics)
    tracker.log_dataset(
        "compressed",
        out / TABLE_FILE,
        digest=manifest["decoded_content_sha256"],
        context="training",
    )
    tracker.log_artifact(out / MANIFEST_FILE)
    return metrics
