"""Federated fine-tuning (FedAvg) of a classifier over the K client shards.

Starts from the pretrained encoder (``models/pretrain``) with a linear head set from federated
class means of its features (FedNCM), then runs ``federate.rounds`` rounds: sample
``client_fraction`` of the clients in ``data/partitions/clients/``, fit each locally for
``local_epochs`` (a Lightning fit, client learning rate decaying over the rounds), average
their weights by sample count, score on val. Writes
``models/federate/model.{safetensors,json}`` (the final classifier), ``rounds.csv``
(round, val_accuracy, train_loss) and ``reports/federate.json``.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.config import FederateParams, Params
from pipelines.errors import DataError
from pipelines.io import (
    ImageTable,
    Paths,
    atomic_outputs,
    content_sha256,
    read_image_table,
    save_weights,
    write_json,
)
from pipelines.tracking import StageTracker

if TYPE_CHECKING:
    from pipelines.models.encoder import Classifier, Encoder

log = logging.getLogger(__name__)


def federate(
    encoder: Encoder,
    clients: list[ImageTable],
    val: ImageTable,
    p: FederateParams,
    seed: int,
    device: str = "auto",
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Classifier, list[dict[str, float]]]:
    """FedAvg fine-tuning of ``encoder`` + a new linear head; returns ``(model, history)``.

    The head starts as a nearest-class-mean classifier built from the clients' federated
    class statistics (:func:`pipelines.federated.fedavg.init_head_from_class_means`);
    ``history`` has one row per round (see :func:`pipelines.federated.fedavg.run_federation`).
    The model is on CPU, eval mode.
    """
    from pipelines.federated.fedavg import init_head_from_class_means, run_federation
    from pipelines.models.encoder import Classifier, build_encoder
    from pipelines.models.systems import pl

    pl.seed_everything(seed, verbose=False)
    start = build_encoder(encoder.config)
    start.load_state_dict(encoder.state_dict())
    model = Classifier(start, val.num_classes)
    state = init_head_from_class_means(model.config, model.state_dict(), clients, device)
    return run_federation(model.config, state, clients, val, p, seed, device, on_round)


def write_rounds(path: Path, history: list[dict[str, float]]) -> None:
    """``round,val_accuracy,train_loss`` CSV, one row per round."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["round", "val_accuracy", "train_loss"])
        for row in history:
            writer.writerow(
                [int(row["round"]), f"{row['val_accuracy']:.6f}", f"{row['train_loss']:.6f}"]
            )


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """FedAvg from the pretrained encoder; write models/federate and its report."""
    from pipelines.models.encoder import load_encoder

    p = params.federate
    encoder = load_encoder(paths.model_dir("pretrain"))
    # the same reading as pretrain.read_clients, kept here so DVC tracks it as this stage's code
    shards = sorted((paths.partitions / "clients").glob("client_*.parquet"))
    if not shards:
        raise DataError(str(paths.partitions / "clients"), "no client shards (has partition run?)")
    clients = [read_image_table(shard) for shard in shards]
    val_path = paths.partitions / "val.parquet"
    val = read_image_table(val_path)
    union = ImageTable(
        np.concatenate([t.images for t in clients]),
        np.concatenate([t.labels for t in clients]),
        val.num_classes,
    )
    tracker.log_dataset("clients", paths.partitions / "clients", content_sha256(union), "training")
    tracker.log_dataset("val", val_path, content_sha256(val), "validation")

    def on_round(round_index: int, row: dict[str, float]) -> None:
        tracker.log_metrics(
            {"round_val_accuracy": row["val_accuracy"], "round_train_loss": row["train_loss"]},
            step=round_index,
        )
        log.info(
            "round %d/%d val_accuracy=%.4f train_loss=%.4f",
            round_index,
            p.rounds,
            row["val_accuracy"],
            row["train_loss"],
        )

    log.info(
        "FedAvg over %d clients (%s rows), %d rounds",
        len(clients),
        "/".join(str(len(t)) for t in clients),
        p.rounds,
    )
    start = time.perf_counter()
    model, history = federate(
        encoder, clients, val, p, params.common.seed, params.common.device, on_round
    )
    seconds = time.perf_counter() - start
    metrics = {
        "val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": max(row["val_accuracy"] for row in history),
        "rounds": p.rounds,
        "clients": len(clients),
        "seconds": seconds,
        "samples_per_s": sum(row["samples"] for row in history) / seconds,
    }

    out = paths.model_dir("federate")
    with atomic_outputs(dirs=[out], files=[paths.report("federate")]) as staged:
        save_weights(model, staged.path(out), model.config, name="model")
        write_rounds(staged.path(out) / "rounds.csv", history)
        write_json(staged.path(paths.report("federate")), metrics)
    tracker.log_metrics(metrics)
    tracker.log_artifact(out, "federate")
    return metrics
