"""Self-supervised pretraining of the encoder (SimCLR, NT-Xent) on the unlabeled pool.

Reads ``data/partitions/unlabeled.parquet`` (its labels are never used), trains
:class:`~pipelines.models.encoder.Encoder` + projection head with two augmented views per
image, and scores the encoder with a cosine kNN and a linear probe, both fitted on the
features of the labeled client shards (their union) and scored on val. Writes
``models/pretrain/encoder.{safetensors,json}``, ``history.csv`` (epoch, train_loss) and
``reports/pretrain.json``.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.checkpoints import open_stage_checkpoint
from pipelines.config import Params, PretrainParams
from pipelines.errors import ConfigError
from pipelines.io import (
    ImageTable,
    Paths,
    TableStream,
    atomic_outputs,
    concat_tables,
    content_sha256,
    read_client_shards,
    read_image_table,
    read_json,
    read_within_budget,
    save_weights,
    table_rows,
    write_image_table,
    write_json,
)
from pipelines.tracking import StageTracker

if TYPE_CHECKING:
    from pipelines.checkpoints import Checkpoint
    from pipelines.models.augment import AugmentConfig
    from pipelines.models.encoder import Encoder

log = logging.getLogger(__name__)


def pretrain(
    unlabeled: ImageTable | TableStream,
    p: PretrainParams,
    seed: int,
    device: str = "auto",
    on_epoch: Callable[[int, float], None] | None = None,
    augment_config: AugmentConfig | None = None,
    checkpoint: Checkpoint | None = None,
) -> tuple[Encoder | None, list[float]]:
    """SimCLR-pretrain a fresh encoder on ``unlabeled.images``; returns ``(encoder, losses)``.

    With a ``checkpoint`` (one device, an in-memory or a streamed pool, or DDP on one or
    several nodes) every epoch is saved, and a saved fit resumes after its last epoch with the
    same result, bit for bit on the CPU (:mod:`pipelines.models.resume`).

    ``augment_config`` replaces the default views (:class:`~pipelines.models.augment.
    AugmentConfig`; benchmarks compare views with it, the stage keeps the default).

    A :class:`TableStream` instead of a table is read from disk chunk by chunk each epoch
    (:class:`~pipelines.models.streaming.StreamingImages`), for pools larger than memory.
    ``losses`` holds the mean NT-Xent of each epoch; ``on_epoch(epoch, loss)`` is called
    after each. The encoder comes back on CPU in eval mode; with ``strategy: ddp`` on a node
    other than node 0 it is None (node 0 holds the trained encoder).
    """
    from pipelines.models.encoder import (
        ProjectionHead,
        build_encoder,
        encoder_config_for,
        to_tensor,
    )
    from pipelines.models.seeding import seed_everything
    from pipelines.models.systems import (
        SimCLRSystem,
        batch_loader,
        make_trainer,
        shuffle_generator,
    )

    shape = unlabeled.layout if isinstance(unlabeled, TableStream) else unlabeled
    if len(shape.labels) == 0:
        raise ValueError("the unlabeled pool is empty")
    config = encoder_config_for(shape.image_shape, shape.channels, p.embedding_dim, p.colour_input)
    if p.strategy == "ddp":
        if augment_config is not None:
            raise ValueError("pretrain with strategy 'ddp' uses the default views")
        if isinstance(unlabeled, TableStream):
            raise ConfigError(
                "pretrain.strategy 'ddp' reads the unlabeled pool into each process's memory; "
                "raise common.memory_budget_mb above its size or use strategy 'single'"
            )
        return _pretrain_ddp(unlabeled, config, p, seed, device, on_epoch, checkpoint)
    seed_everything(seed)
    encoder = build_encoder(config)
    head = ProjectionHead(p.embedding_dim, p.projection_dim)
    system = SimCLRSystem(
        encoder,
        head,
        temperature=p.temperature,
        learning_rate=p.learning_rate,
        weight_decay=p.weight_decay,
        warmup_epochs=p.warmup_epochs,
        seed=seed,
        on_epoch_end=on_epoch,
        total_epochs=p.epochs,
        **({"augment_config": augment_config} if augment_config is not None else {}),
    )
    streamed = None
    if isinstance(unlabeled, TableStream):
        from torch.utils.data import DataLoader

        from pipelines.models.streaming import StreamingImages

        streamed = StreamingImages(unlabeled, p.batch_size, seed)
        loader = DataLoader(streamed, batch_size=None)
        loader_generators = {}  # a streamed epoch's order depends on its number alone
    else:
        loader = batch_loader(to_tensor(unlabeled.images), batch_size=p.batch_size, seed=seed)
        loader_generators = {"shuffle": shuffle_generator(loader)}
    callbacks, done = [], 0
    if checkpoint is not None:
        from pipelines.models.resume import EpochCheckpoint, saved_module_state

        saved = checkpoint.load()
        resume = EpochCheckpoint(checkpoint, loader_generators, saved)
        callbacks, done = [resume], resume.done_epochs
        if streamed is not None:
            streamed.epoch = done
        if done:
            log.info("resuming after epoch %d of %d (%s)", done, p.epochs, checkpoint.path)
        if done >= p.epochs:  # killed after the last epoch: its weights are the result
            system.load_state_dict(saved_module_state(saved))
            return encoder.cpu().eval(), list(saved[1]["history"])
    make_trainer(p.epochs - done, device, callbacks).fit(system, loader)
    return encoder.cpu().eval(), list(system.history)


def _pretrain_ddp(
    unlabeled: ImageTable,
    config: dict,
    p: PretrainParams,
    seed: int,
    device: str,
    on_epoch: Callable[[int, float], None] | None,
    checkpoint: Checkpoint | None = None,
) -> tuple[Encoder | None, list[float]]:
    """:func:`pretrain` in DDP processes (:mod:`pipelines.models.distributed`); with a
    ``checkpoint`` the fit saves every epoch (on node 0) and resumes from a saved one (over
    several nodes, every node from node 0's)."""
    import tempfile

    from pipelines.models.devices import resolve_accelerator
    from pipelines.models.distributed import fit_distributed

    with tempfile.TemporaryDirectory(prefix="lepton-ddp-") as scratch:
        table = Path(scratch) / "unlabeled.parquet"
        write_image_table(unlabeled, table)
        encoder, losses, result = fit_distributed(
            table,
            config,
            p.model_dump(mode="json"),
            seed,
            resolve_accelerator(device),
            Path(scratch) / "out",
            checkpoint.path if checkpoint is not None else None,
        )
    if encoder is None:
        return None, losses
    log.info(
        "DDP over %d processes, rows per rank %s", result["world_size"], result["rows_per_rank"]
    )
    if on_epoch is not None:
        for epoch, loss in enumerate(losses, start=1):
            on_epoch(epoch, loss)
    return encoder, losses


def probe_encoder(
    encoder: Encoder, labeled: ImageTable, val: ImageTable, k: int, device: str = "auto"
) -> dict[str, float]:
    """``val_knn_accuracy`` and ``val_linear_probe_accuracy`` of ``encoder``'s features,
    probes fitted on ``labeled``."""
    from pipelines.models.devices import resolve_accelerator
    from pipelines.models.probes import extract_features, knn_accuracy, linear_probe_accuracy

    accelerator = resolve_accelerator(device)
    train_feats = extract_features(encoder, labeled.images, device=accelerator)
    val_feats = extract_features(encoder, val.images, device=accelerator)
    return {
        "val_knn_accuracy": knn_accuracy(train_feats, labeled.labels, val_feats, val.labels, k),
        "val_linear_probe_accuracy": linear_probe_accuracy(
            train_feats, labeled.labels, val_feats, val.labels
        ),
    }


def write_history(path: Path, losses: list[float], unit: str = "epoch") -> None:
    """``epoch,train_loss`` CSV, one row per epoch (``round,train_loss`` per round for
    federated pretraining)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([unit, "train_loss"])
        for epoch, loss in enumerate(losses, start=1):
            writer.writerow([epoch, f"{loss:.6f}"])


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Pretrain on the unlabeled pool (or at the clients, ``mode: federated``), probe on val;
    write models/pretrain and its report."""
    p = params.pretrain
    val_path = paths.partitions / "val.parquet"
    val = read_image_table(val_path)
    tracker.log_dataset("val", val_path, content_sha256(val), "validation")
    if params.federation.remote:  # no client row here: the probes split val in two
        shard_tables = []
        labeled, val = probe_halves(val)
    else:
        shard_tables = read_client_shards(paths.partitions)
        labeled = concat_tables([table for _, table in shard_tables])
        tracker.log_dataset(
            "clients", paths.partitions / "clients", content_sha256(labeled), "probe"
        )
    if p.method == "scattering":
        return _run_scattering(params, paths, tracker, labeled, val)
    if p.mode == "federated":
        return _run_federated(params, paths, tracker, shard_tables, labeled, val)
    unlabeled_path = paths.partitions / "unlabeled.parquet"
    unlabeled = read_within_budget(unlabeled_path, params.common.memory_budget_mb)
    unlabeled_sha256 = (
        unlabeled.content_sha256()
        if isinstance(unlabeled, TableStream)
        else content_sha256(unlabeled)
    )
    tracker.log_dataset("unlabeled", unlabeled_path, unlabeled_sha256, "training")
    trained_on = unlabeled_source(paths)

    def on_epoch(epoch: int, loss: float) -> None:
        tracker.log_metrics({"epoch_train_loss": loss}, step=epoch)
        log.info("epoch %d/%d train_loss=%.4f", epoch, p.epochs, loss)

    shape = unlabeled.layout if isinstance(unlabeled, TableStream) else unlabeled
    log.info(
        "SimCLR on %d unlabeled images (%s) %s x %d channels, %d epochs%s",
        len(shape.labels),
        trained_on,
        shape.image_shape,
        shape.channels,
        p.epochs,
        " (read from disk in chunks)" if isinstance(unlabeled, TableStream) else "",
    )
    start = time.perf_counter()
    # resumes after a kill (DDP over several nodes: from node 0's checkpoint)
    checkpoint = open_stage_checkpoint(paths.root, "pretrain", params)
    encoder, losses = pretrain(
        unlabeled,
        p,
        params.common.seed,
        params.common.device,
        on_epoch,
        checkpoint=checkpoint,
    )
    seconds = time.perf_counter() - start
    if encoder is None:  # a DDP worker node: node 0 writes the outputs
        log.info("DDP node done in %.1f s; node 0 writes models/pretrain", seconds)
        return {"seconds": seconds}
    probes = probe_encoder(encoder, labeled, val, p.knn_k, params.common.device)
    metrics = {
        "train_loss": losses[-1],
        **probes,
        "epochs": p.epochs,
        "seconds": seconds,
        "samples_per_s": p.epochs * len(shape.labels) / seconds,
    }
    return _write_outputs(paths, tracker, encoder, losses, metrics, "epoch", trained_on)


def unlabeled_source(paths: Paths) -> str:
    """Whose rows ``unlabeled.parquet`` holds, as partition's manifest declares it
    (``unlabeled_source``: ``"public split"``, ``"server-held rows"`` or ``"client rows"``);
    ``"client rows"`` when the manifest does not say."""
    manifest = paths.partitions / "manifest.json"
    if not manifest.is_file():
        return "client rows"
    return str(read_json(manifest).get("unlabeled_source", "client rows"))


def probe_halves(val: ImageTable) -> tuple[ImageTable, ImageTable]:
    """``(reference, scored)``: val's even and odd rows. In remote mode the workspace holds
    no labeled training row, so the probes fit on one half of val and score the other."""
    rows = np.arange(len(val.labels))
    return val.subset(rows[0::2]), val.subset(rows[1::2])


def _run_federated(
    params: Params,
    paths: Paths,
    tracker: StageTracker,
    shard_tables: list[tuple[Path, ImageTable]],
    labeled: ImageTable,
    val: ImageTable,
) -> dict[str, float]:
    """``mode: federated``: SimCLR at each client on its own shard, FedAvg of the weights
    (:mod:`pipelines.federated.ssl`); the unlabeled pool is not read. The shards are the
    ones the probes read (in memory: the probes need their union anyway)."""
    from pipelines.federated.sites import check_site_data, expected_data
    from pipelines.federated.ssl import pretrain_federated, pretrain_federated_on_flower

    p = params.pretrain
    expected = expected_data(val)
    remote = params.federation.remote
    for path, table in shard_tables:
        check_site_data(table, expected, str(path))
    clients = [table for _, table in shard_tables]

    def on_round(round_index: int, loss: float) -> None:
        tracker.log_metrics({"round_train_loss": loss}, step=round_index)
        log.info("round %d/%d mean client train_loss=%.4f", round_index, p.rounds, loss)

    log.info(
        "federated SimCLR at %d clients (%s), %d rounds of %d local epochs",
        params.federation.sites if remote else len(clients),
        "/".join(str(table_rows(t)) for t in clients) + " rows"
        if clients
        else f"rows at the sites of {params.federation.superlink}",
        p.rounds,
        p.local_epochs,
    )
    start = time.perf_counter()
    checkpoint = open_stage_checkpoint(paths.root, "pretrain", params)  # each round
    if p.runtime == "flower":
        import tempfile

        (paths.root / ".lepton").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="flower-", dir=paths.root / ".lepton") as tmp:
            encoder, losses = pretrain_federated_on_flower(
                [path for path, _ in shard_tables],
                p,
                params.federation,
                expected,
                read_json(paths.partitions / "manifest.json")["normalization"],
                params.common.seed,
                params.common.device,
                Path(tmp),
                on_round,
                checkpoint,
            )
    else:
        encoder, losses = pretrain_federated(
            clients, p, params.common.seed, params.common.device, on_round, checkpoint
        )
    seconds = time.perf_counter() - start
    probes = probe_encoder(encoder, labeled, val, p.knn_k, params.common.device)
    metrics = {
        "train_loss": losses[-1],
        **probes,
        "rounds": p.rounds,
        "seconds": seconds,
    }
    if not remote:  # the sites' row counts stay at the sites
        metrics["samples_per_s"] = p.rounds * p.local_epochs * len(labeled) / seconds
    return _write_outputs(paths, tracker, encoder, losses, metrics, "round", "client rows")


def _run_scattering(
    params: Params, paths: Paths, tracker: StageTracker, labeled: ImageTable, val: ImageTable
) -> dict[str, float]:
    """``method: scattering``: the encoder is a fixed ScatterNet for val's image shape and
    channels (:mod:`pipelines.models.scattering`); nothing is trained, no pool row is read.
    The probes score its features as for SimCLR."""
    from pipelines.models.scattering import ScatteringEncoder

    p = params.pretrain
    start = time.perf_counter()
    encoder = ScatteringEncoder(
        val.image_shape, val.channels, p.scattering_scales, p.scattering_orientations
    )
    log.info(
        "scattering encoder J=%d L=%d on %s x %d channels: %d features, learnt from no row",
        p.scattering_scales,
        p.scattering_orientations,
        val.image_shape,
        val.channels,
        encoder.embedding_dim,
    )
    probes = probe_encoder(encoder, labeled, val, p.knn_k, params.common.device)
    metrics = {**probes, "trained_rows": 0, "seconds": time.perf_counter() - start}
    tracker.set_tags({"lepton.encoder": "scattering"})
    return _write_outputs(paths, tracker, encoder, [], metrics, "epoch", "no rows")


def _write_outputs(
    paths: Paths,
    tracker: StageTracker,
    encoder: Encoder,
    losses: list[float],
    metrics: dict[str, float],
    unit: str,
    trained_on: str,
) -> dict[str, float]:
    """models/pretrain (encoder, history.csv per ``unit``) and reports/pretrain.json, at once.

    ``encoder.json`` records whose rows the encoder learnt from (``trained_on``: ``"no rows"``,
    ``"client rows"``, ``"public split"``, ``"server-held rows"``); record-level DP in
    federate accepts only features that saw no client row."""
    log.info(
        "val kNN accuracy %.4f, linear probe %.4f (%.1f s)",
        metrics["val_knn_accuracy"],
        metrics["val_linear_probe_accuracy"],
        metrics["seconds"],
    )
    out = paths.model_dir("pretrain")
    with atomic_outputs(dirs=[out], files=[paths.report("pretrain")]) as staged:
        config = {**encoder.config, "trained_on": trained_on}
        save_weights(encoder, staged.path(out), config, name="encoder")
        write_history(staged.path(out) / "history.csv", losses, unit)
        write_json(staged.path(paths.report("pretrain")), metrics)
    tracker.set_tags({"lepton.encoder_trained_on": trained_on})
    tracker.log_metrics(metrics)
    tracker.log_artifact(out, "pretrain")
    return metrics
