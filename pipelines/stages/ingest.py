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
from pipelines.data.sources import open_source
from pipelines.io import (
    ContentHasher,
    ImageTableWriter,
    Paths,
    TableLayout,
    TableStream,
    atomic_outputs,
    sha256_file,
    write_json,
)
from pipelines.tracking import StageTracker

log = logging.getLogger(__name__)

TABLE_FILE = "table.parquet"
MANIFEST_FILE = "manifest.json"


def write_raw_table(stream: TableStream, path: Path) -> dict[str, Any]:
    """Write ``stream`` batch by batch as the contract table ``path`` (uint8 pixels when the
    layout says they fit losslessly, else float32); return the rows, pixel range and
    content sha256 measured on the way."""
    layout = stream.layout
    hasher = ContentHasher(layout.rows, layout.channels, layout.image_shape, layout.num_classes)
    low, high = np.inf, -np.inf
    pixel_dtype = "uint8" if layout.pixel_type == "uint8" else "float32"
    with ImageTableWriter(
        path, layout.channels, layout.image_shape, layout.num_classes, pixel_dtype
    ) as writer:
        for _, images, labels in stream.batches_with_labels():
            low, high = min(low, float(images.min())), max(high, float(images.max()))
            hasher.update(images, labels)
            writer.write(images, labels)
    return {"pixel_min": low, "pixel_max": high, "content_sha256": hasher.hexdigest()}


def describe(layout: TableLayout, p: IngestParams, root: Path) -> dict[str, Any]:
    """The manifest fields that depend only on the layout and the params."""
    h, w = layout.image_shape
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
        "rows": layout.rows,
        "image_shape": [h, w],
        "channels": layout.channels,
        "resize": list(p.resize) if p.resize is not None else None,
        "pixel_type": layout.pixel_type,
        "num_classes": layout.num_classes,
        "class_counts": np.bincount(layout.labels, minlength=layout.num_classes).tolist(),
    }
    if p.source == "images":
        manifest["class_names"] = [d.name for d in class_folders(resolve(p.path, root))]
    return manifest


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Ingest the source into ``data/raw``; return rows, classes and image size.

    A contract Parquet source streams through in batches (bounded memory); the others are
    read whole (see :func:`pipelines.data.sources.open_source`).
    """
    import pyarrow.parquet as pq

    p = params.ingest
    log.info("reading source %s%s", p.source, f" from {p.path}" if p.path else "")
    stream = open_source(p, paths.root)
    layout = stream.layout
    manifest = describe(layout, p, paths.root)
    h, w = layout.image_shape
    metrics = {
        "rows": layout.rows,
        "num_classes": layout.num_classes,
        "height": h,
        "width": w,
        "channels": layout.channels,
    }
    out, report = paths.raw, paths.report("ingest")
    with atomic_outputs(dirs=[out], files=[report]) as staged:
        table_path = staged.path(out) / TABLE_FILE
        manifest.update(write_raw_table(stream, table_path))
        schema = pq.read_schema(table_path)
        manifest["file_sha256"] = sha256_file(table_path)
        manifest["schema"] = {field.name: str(field.type) for field in schema}
        write_json(staged.path(out) / MANIFEST_FILE, manifest)
        write_json(staged.path(report), metrics)
    log.info(
        "wrote %d rows of %dx%dx%d pixels, %d classes to %s",
        layout.rows,
        h,
        w,
        layout.channels,
        layout.num_classes,
        out,
    )
    tracker.log_metrics(metrics)
    tracker.log_dataset(
        "raw", out / TABLE_FILE, digest=manifest["content_sha256"], context="training"
    )
    tracker.log_artifact(out / MANIFEST_FILE)
    return metrics
