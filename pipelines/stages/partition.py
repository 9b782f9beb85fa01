"""Split the data: test and val sets, an unlabeled pool, a labeled share, K client shards.

Reads ``data/compressed`` (any encoding, through ``read_compressed``), scales pixels to
float32 in [0, 1] with the source's pixel range from the compress manifest (lossy
reconstructions that overshoot the range are clipped), then writes to ``data/partitions``:

- ``test.parquet``, ``val.parquet``: stratified hold-out sets.
- ``unlabeled.parquet``: every training-pool row. The contract needs labels, so the true
  labels are stored; self-supervised pretraining never reads them (only evaluation probes
  may, as a labeled reference). With ``public_fraction`` > 0 it holds only the public split:
  that share of the training pool, declared public, which no client holds (the manifest's
  ``unlabeled_source`` says ``"public split"``), so an encoder pretrained on it costs the
  clients no privacy (record-level DP, ``federate.dp.unit: record``).
- ``clients/client_000.parquet`` ...: the labeled share (``labeled_fraction`` of the
  training pool, less any public split), sharded IID or with Dirichlet(alpha) label skew.
- ``manifest.json`` (seed, skew, alpha, row counts, per-client label histograms) and
  ``client_labels.png`` (stacked bars of each client's label counts).

In remote mode (``federation.superlink`` set) the sites hold the client rows: the workspace's
own rows become test, val and the unlabeled pool (server-held data, ``unlabeled_source``
``"server-held rows"``), and no client shard is written (``clients/`` stays empty, the
manifest says ``"sites": "remote"``).

Every file follows the image-table contract: read them with ``pipelines.io.read_image_table``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import Params, PartitionParams
from pipelines.data.codecs import compressed_stream, normalize_pixels
from pipelines.data.splits import (
    label_histograms,
    label_skew,
    select_labeled,
    shard_clients,
    split_holdout,
    split_public,
)
from pipelines.io import (
    ContentHasher,
    ImageTable,
    ImageTableWriter,
    Paths,
    TableStream,
    atomic_outputs,
    read_json,
    write_json,
)
from pipelines.tracking import StageTracker

log = logging.getLogger(__name__)


def partition_rows(
    labels: np.ndarray, p: PartitionParams, seed: int, remote_sites: bool = False
) -> dict[str, Any]:
    """Which rows go where: sorted row indices into the whole table for ``test``, ``val``,
    ``unlabeled`` (the training pool, or only its public split with ``public_fraction``),
    ``labeled`` and each of ``clients``, plus ``shards``: each client's rows as indices into
    ``labeled``. Only the labels are needed. With ``remote_sites`` the sites hold the
    clients' rows: no row is labeled, no client shard."""
    train, val, test = split_holdout(labels, p.test_fraction, p.val_fraction, seed)
    if remote_sites:
        none = np.zeros(0, dtype=np.int64)
        return {
            "test": test,
            "val": val,
            "train": train,
            "public": none,
            "unlabeled": train,
            "labeled": none,
        }
    private, public = split_public(labels[train], p.public_fraction, seed)
    pool = train
    unlabeled = train[public] if len(public) else train
    train = train[private]
    labeled = train[select_labeled(labels[train], p.labeled_fraction, seed)]
    shards = shard_clients(labels[labeled], p.num_clients, p.skew, p.alpha, p.min_client_rows, seed)
    return {
        "test": test,
        "val": val,
        "train": pool,
        "public": pool[public],
        "unlabeled": unlabeled,
        "labeled": labeled,
        "clients": [labeled[s] for s in shards],
        "shards": shards,
    }


def client_label_histograms(
    labels: np.ndarray, rows: dict[str, Any], num_classes: int
) -> np.ndarray:
    """Label counts ``(clients, num_classes)`` of the client shards :func:`partition_rows`
    made."""
    if "shards" not in rows:  # remote sites: no client shard here
        return np.zeros((0, num_classes), dtype=np.int64)
    return label_histograms(labels[rows["labeled"]], rows["shards"], num_classes)


def partition(table: ImageTable, p: PartitionParams, seed: int) -> dict[str, Any]:
    """Split an in-memory ``table``: the tables by name and the per-client label histograms."""
    rows = partition_rows(table.labels, p, seed)
    histograms = client_label_histograms(table.labels, rows, table.num_classes)
    return {
        **{name: table.subset(rows[name]) for name in ("test", "val", "unlabeled", "labeled")},
        "clients": [table.subset(c) for c in rows["clients"]],
        "histograms": histograms,
    }


class _RowRouter:
    """Sends each streamed row to the outputs whose sorted row indices hold it."""

    def __init__(self, outputs: dict[str, tuple[np.ndarray, ImageTableWriter | None, Any]]):
        self.outputs = outputs

    def route(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Write the rows ``start .. start + len(images)`` to their outputs."""
        stop = start + len(images)
        for rows, writer, hasher in self.outputs.values():
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                local = rows[lo:hi] - start
                if writer is not None:
                    writer.write(images[local], labels[local])
                if hasher is not None:
                    hasher.update(images[local], labels[local])


def write_partitions(
    stream: TableStream, rows: dict[str, Any], low: float, high: float, folder: Path
) -> tuple[dict[str, str], float]:
    """Normalize the streamed table batch by batch and write every split into ``folder``
    (``clients/`` must exist); return the content sha256 of test, val, unlabeled and
    labeled, and the share of pixels clipped by the normalization."""
    layout = stream.layout
    outputs: dict[str, tuple[np.ndarray, ImageTableWriter | None, Any]] = {}
    for name in ("test", "val", "unlabeled", "labeled"):
        indices = rows[name]
        writer = (  # the labeled union is hashed, not written (the client shards hold it)
            ImageTableWriter(
                folder / f"{name}.parquet", layout.channels, layout.image_shape, layout.num_classes
            )
            if name != "labeled"
            else None
        )
        hasher = ContentHasher(
            len(indices), layout.channels, layout.image_shape, layout.num_classes
        )
        outputs[name] = (indices, writer, hasher)
    for index, indices in enumerate(rows.get("clients", [])):
        path = folder / "clients" / f"{client_name(index)}.parquet"
        writer = ImageTableWriter(path, layout.channels, layout.image_shape, layout.num_classes)
        outputs[client_name(index)] = (indices, writer, None)
    router = _RowRouter(outputs)
    clipped = total = 0.0
    try:
        for start, images, labels in stream.batches_with_labels():
            scaled, share = normalize_pixels(images, low, high)
            clipped += share * scaled.size
            total += scaled.size
            router.route(start, scaled, labels)
    finally:
        for _, writer, _ in outputs.values():
            if writer is not None:
                writer.close()
    digests = {
        name: outputs[name][2].hexdigest() for name in ("test", "val", "unlabeled", "labeled")
    }
    return digests, clipped / total if total else 0.0


def unlabeled_source(remote: bool, public_rows: int) -> str:
    """Whose rows ``unlabeled.parquet`` holds (the manifest's ``unlabeled_source``):
    ``"server-held rows"`` in remote mode, ``"public split"`` with a public split, else
    ``"client rows"`` (the same rows the client shards hold)."""
    if remote:
        return "server-held rows"
    return "public split" if public_rows else "client rows"


def client_name(index: int) -> str:
    """File stem of client ``index``: ``client_000``."""
    return f"client_{index:03d}"


def plot_client_labels(histograms: np.ndarray, p: PartitionParams, path: Path) -> None:
    """Stacked bar chart: one bar per client, one colour per label (a note when the sites
    hold the client rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients, classes = histograms.shape
    if clients == 0:
        fig, ax = plt.subplots(figsize=(6.0, 2.0))
        ax.axis("off")
        ax.text(0.5, 0.5, "Remote sites: each SuperNode holds its own rows", ha="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
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
    """Partition ``data/compressed`` into ``data/partitions`` batch by batch (bounded memory);
    return row counts and skew."""
    p, seed = params.partition, params.common.seed
    source = read_json(paths.compressed / "manifest.json")
    stream = compressed_stream(paths.compressed)
    layout = stream.layout
    remote = params.federation.remote
    rows = partition_rows(layout.labels, p, seed, remote_sites=remote)
    histograms = client_label_histograms(layout.labels, rows, layout.num_classes)
    sizes = histograms.sum(1)
    metrics = {
        "train_rows": len(rows["train"]),
        "public_rows": len(rows["public"]),
        "labeled_rows": len(rows["labeled"]),
        "val_rows": len(rows["val"]),
        "test_rows": len(rows["test"]),
        "num_clients": len(histograms),
        "min_client_rows": int(sizes.min()) if len(sizes) else 0,
        "max_client_rows": int(sizes.max()) if len(sizes) else 0,
        "label_skew": label_skew(histograms) if len(sizes) else 0.0,
    }
    names = [client_name(i) for i in range(len(histograms))]
    out, report = paths.partitions, paths.report("partition")
    with atomic_outputs(dirs=[out], files=[report]) as staged:
        folder = staged.path(out)
        (folder / "clients").mkdir()
        digests, clipped = write_partitions(
            stream, rows, source["pixel_min"], source["pixel_max"], folder
        )
        manifest = {
            "seed": seed,
            **p.model_dump(mode="json"),
            "sites": f"remote ({params.federation.superlink})" if remote else "shards",
            "num_classes": layout.num_classes,
            "image_shape": list(layout.image_shape),
            "channels": layout.channels,
            "normalization": {
                "low": min(source["pixel_min"], 0.0),
                "high": source["pixel_max"],
                "clipped_fraction": clipped,
            },
            "rows": {
                k: metrics[k]
                for k in ("train_rows", "public_rows", "labeled_rows", "val_rows", "test_rows")
            },
            "client_rows": dict(zip(names, sizes.tolist(), strict=True)),
            "client_label_histograms": dict(zip(names, histograms.tolist(), strict=True)),
            "label_skew": metrics["label_skew"],
            "unlabeled_source": unlabeled_source(remote, metrics["public_rows"]),
            "unlabeled_note": "unlabeled.parquet keeps the true labels; pretraining ignores them",
            "source_content_sha256": source.get("source_content_sha256"),
        }
        write_json(folder / "manifest.json", manifest)
        plot_client_labels(histograms, p, folder / "client_labels.png")
        write_json(staged.path(report), metrics)
    if remote:
        log.info(
            "remote sites (%s): train pool %d, val %d, test %d; no client shard written",
            params.federation.superlink,
            *(metrics[k] for k in ("train_rows", "val_rows", "test_rows")),
        )
    else:
        log.info(
            "train %d (public %d, labeled %d), val %d, test %d; %d clients of %d..%d rows, "
            "label skew %.3f",
            *(
                metrics[k]
                for k in ("train_rows", "public_rows", "labeled_rows", "val_rows", "test_rows")
            ),
            p.num_clients,
            metrics["min_client_rows"],
            metrics["max_client_rows"],
            metrics["label_skew"],
        )
    tracker.log_metrics(metrics)
    for name, context in (("test", "evaluation"), ("val", "validation"), ("unlabeled", "training")):
        tracker.log_dataset(name, out / f"{name}.parquet", digest=digests[name], context=context)
    if not remote:
        tracker.log_dataset(
            "clients", out / "clients", digest=digests["labeled"], context="training"
        )
    tracker.log_artifact(out / "manifest.json")
    tracker.log_artifact(out / "client_labels.png")
    return metrics
