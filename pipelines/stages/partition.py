"""Split the data: test and val sets, an unlabeled pool, a labeled share, K client shards.

Reads ``data/compressed`` (any encoding, through ``read_compressed``), scales pixels to
float32 in [0, 1] with the source's pixel range from the compress manifest (lossy
reconstructions that overshoot the range are clipped), then writes to ``data/partitions``:

- ``test.parquet``, ``val.parquet``: stratified hold-out sets.
- ``unlabeled.parquet``: every training-pool row. The contract needs labels, so the true
  labels are stored; self-supervised pretraining never reads them (only evaluation probes
  may, as a labeled reference).
- ``clients/client_000.parquet`` ...: the labeled share (``labeled_fraction`` of the
  training pool), sharded IID or with Dirichlet(alpha) label skew.
- ``manifest.json`` (seed, skew, alpha, row counts, per-client label histograms) and
  ``client_labels.png`` (stacked bars of each client's label counts).

Every file follows the image-table contract: read them with ``pipelines.io.read_image_table``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import Params, PartitionParams
from pipelines.data.codecs import read_compressed
from pipelines.data.splits import (
    label_histograms,
    label_skew,
    select_labeled,
    shard_clients,
    split_holdout,
)
from pipelines.io import (
    ImageTable,
    Paths,
    atomic_outputs,
    content_sha256,
    read_json,
    write_image_table,
    write_json,
)
from pipelines.tracking import StageTracker

log = logging.getLogger(__name__)


def normalize_pixels(images: np.ndarray, low: float, high: float) -> tuple[np.ndarray, float]:
    """Map ``[min(low, 0), high]`` onto [0, 1], clipping; return images and the clipped share."""
    low = min(low, 0.0)
    span = high - low if high > low else 1.0
    scaled = (images.astype(np.float64) - low) / span
    clipped = float(np.mean((scaled < 0) | (scaled > 1))) if scaled.size else 0.0
    return np.clip(scaled, 0.0, 1.0).astype(np.float32), clipped


def partition(table: ImageTable, p: PartitionParams, seed: int) -> dict[str, Any]:
    """Split ``table``: returns the tables by name and the per-client label histograms."""
    train, val, test = split_holdout(table.labels, p.test_fraction, p.val_fraction, seed)
    pool = table.subset(train)
    labeled = pool.subset(select_labeled(pool.labels, p.labeled_fraction, seed))
    shards = shard_clients(labeled.labels, p.num_clients, p.skew, p.alpha, p.min_client_rows, seed)
    return {
        "test": table.subset(test),
        "val": table.subset(val),
        "unlabeled": pool,
        "labeled": labeled,
        "clients": [labeled.subset(s) for s in shards],
        "histograms": label_histograms(labeled.labels, shards, table.num_classes),
    }


def client_name(index: int) -> str:
    """File stem of client ``index``: ``client_000``."""
    return f"client_{index:03d}"


def plot_client_labels(histograms: np.ndarray, p: PartitionParams, path: Path) -> None:
    """Stacked bar chart: one bar per client, one colour per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients, classes = histograms.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * clients + 2), 4.5))
    colors = plt.get_cmap("tab20" if classes > 10 else "tab10")
    bottom = np.zeros(clients)
    for label in range(classes):
        ax.bar(
            np.arange(clients),
            histograms[:, label],
            bottom=bottom,
            color=colors(label % colors.N),
            label=str(label),
        )
        bottom += histograms[:, label]
    title = f"Client label counts: {p.skew}"
    if p.skew == "dirichlet":
        title += f" (alpha = {p.alpha:g})"
    ax.set_title(title)
    ax.set_xlabel("client")
    ax.set_ylabel("labeled rows")
    if clients <= 40:
        ax.set_xticks(np.arange(clients))
    if classes <= 20:
        ax.legend(title="label", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Partition ``data/compressed`` into ``data/partitions``; return row counts and skew."""
    p, seed = params.partition, params.common.seed
    source = read_json(paths.compressed / "manifest.json")
    decoded = read_compressed(paths.compressed)
    images, clipped = normalize_pixels(decoded.images, source["pixel_min"], source["pixel_max"])
    table = ImageTable(images, decoded.labels, decoded.num_classes)
    parts = partition(table, p, seed)
    histograms = parts["histograms"]
    sizes = histograms.sum(1)
    metrics = {
        "train_rows": len(parts["unlabeled"]),
        "labeled_rows": len(parts["labeled"]),
        "val_rows": len(parts["val"]),
        "test_rows": len(parts["test"]),
        "num_clients": p.num_clients,
        "min_client_rows": int(sizes.min()),
        "max_client_rows": int(sizes.max()),
        "label_skew": label_skew(histograms),
    }
    names = [client_name(i) for i in range(p.num_clients)]
    manifest = {
        "seed": seed,
        **p.model_dump(mode="json"),
        "num_classes": table.num_classes,
        "image_shape": list(table.image_shape),
        "channels": table.channels,
        "normalization": {
            "low": min(source["pixel_min"], 0.0),
            "high": source["pixel_max"],
            "clipped_fraction": clipped,
        },
        "rows": {k: metrics[k] for k in ("train_rows", "labeled_rows", "val_rows", "test_rows")},
        "client_rows": dict(zip(names, sizes.tolist(), strict=True)),
        "client_label_histograms": dict(zip(names, histograms.tolist(), strict=True)),
        "label_skew": metrics["label_skew"],
        "unlabeled_note": "unlabeled.parquet keeps the true labels; pretraining ignores them",
        "source_content_sha256": source.get("source_content_sha256"),
    }
    out, report = paths.partitions, paths.report("partition")
    with atomic_outputs(dirs=[out], files=[report]) as staged:
        folder = staged.path(out)
        (folder / "clients").mkdir()
        for name in ("test", "val", "unlabeled"):
            write_image_table(parts[name], folder / f"{name}.parquet")
        for name, shard in zip(names, parts["clients"], strict=True):
            write_image_table(shard, folder / "clients" / f"{name}.parquet")
        write_json(folder / "manifest.json", manifest)
        plot_client_labels(histograms, p, folder / "client_labels.png")
        write_json(staged.path(report), metrics)
    log.info(
        "train %d (labeled %d), val %d, test %d; %d clients of %d..%d rows, label skew %.3f",
        *(metrics[k] for k in ("train_rows", "labeled_rows", "val_rows", "test_rows")),
        p.num_clients,
        metrics["min_client_rows"],
        metrics["max_client_rows"],
        metrics["label_skew"],
    )
    tracker.log_metrics(metrics)
    for name, context in (("test", "evaluation"), ("val", "validation"), ("unlabeled", "training")):
        tracker.log_dataset(
            name, out / f"{name}.parquet", digest=content_sha256(parts[name]), context=context
        )
    tracker.log_dataset(
        "clients", out / "clients", digest=content_sha256(parts["labeled"]), context="training"
    )
    tracker.log_artifact(out / "manifest.json")
    tracker.log_artifact(out / "client_labels.png")
    return metrics
