"""Read the source ``ingest.source`` names, validate it, write one Parquet table and a manifest.

Outputs in ``data/raw``: ``table.parquet`` (the image-table contract, float32 pixels at the
source's own scale) and ``manifest.json`` (source, path, rows, shape, channels, the resize
asked for, classes, pixel range, content and file sha256, schema). Any problem with the
input is a DataError naming the file, field and row, raised before anything is written, so
the previous outputs stay.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import IngestParams, Params
from pipelines.data.source_files import (
    HASH_CACHE_FILE,
    HashCache,
    class_folders,
    resolve,
    source_paths,
)
from pipelines.data.sources import load_source
from pipelines.io import (
    ImageTable,
    Paths,
    atomic_outputs,
    content_sha256,
    sha256_file,
    write_image_table,
    write_json,
)
from pipelines.tracking import StageTracker

log = logging.getLogger(__name__)

TABLE_FILE = "table.parquet"
MANIFEST_FILE = "manifest.json"


def ingest(p: IngestParams, root: Path) -> ImageTable:
    """Load and validate the configured source (relative paths are relative to ``root``)."""
    return load_source(p, root)


def describe(table: ImageTable, p: IngestParams, root: Path) -> dict[str, Any]:
    """The manifest fields that depend only on the table and the params."""
    h, w = table.image_shape
    hashes = HashCache(root / HASH_CACHE_FILE)  # the source probe hashed them already
    files = [
        {"path": str(path), "sha256": hashes.sha256(path)}
        for path in source_paths(p, root)
        if path.is_file()
    ]
    manifest: dict[str, Any] = {
        "source": p.source,
        "path": p.path,
        "labels_path": p.labels_path,
        "source_files": files,
        "rows": len(table),
        "image_shape": [h, w],
        "channels": table.channels,
        "resize": list(p.resize) if p.resize is not None else None,
        "num_classes": table.num_classes,
        "class_counts": np.bincount(table.labels, minlength=table.num_classes).tolist(),
        "pixel_min": float(table.images.min()),
        "pixel_max": float(table.images.max()),
        "content_sha256": content_sha256(table),
    }
    if p.source == "images":
        manifest["class_names"] = [d.name for d in class_folders(resolve(p.path, root))]
    return manifest


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Ingest the source into ``data/raw``; return rows, classes and image size."""
    import pyarrow.parquet as pq

    p = params.ingest
    log.info("reading source %s%s", p.source, f" from {p.path}" if p.path else "")
    table = ingest(p, paths.root)
    manifest = describe(table, p, paths.root)
    h, w = table.image_shape
    metrics = {
        "rows": len(table),
        "num_classes": table.num_classes,
        "height": h,
        "width": w,
        "channels": table.channels,
    }
    out, report = paths.raw, paths.report("ingest")
    with atomic_outputs(dirs=[out], files=[report]) as staged:
        table_path = staged.path(out) / TABLE_FILE
        write_image_table(table, table_path)
        schema = pq.read_schema(table_path)
        manifest["file_sha256"] = sha256_file(table_path)
        manifest["schema"] = {field.name: str(field.type) for field in schema}
        write_json(staged.path(out) / MANIFEST_FILE, manifest)
        write_json(staged.path(report), metrics)
    log.info(
        "wrote %d rows of %dx%dx%d pixels, %d classes to %s",
        len(table),
        h,
        w,
        table.channels,
        table.num_classes,
        out,
    )
    tracker.log_metrics(metrics)
    tracker.log_dataset(
        "raw", out / TABLE_FILE, digest=manifest["content_sha256"], context="training"
    )
    tracker.log_artifact(out / MANIFEST_FILE)
    return metrics
