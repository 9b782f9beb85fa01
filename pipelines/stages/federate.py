"""Federated fine-tuning of a classifier over the K client shards.

Starts from the pretrained encoder (``models/pretrain``) with a linear head set from federated
class means of its features (FedNCM), then runs ``federate.rounds`` rounds: sample
``client_fraction`` of the clients in ``data/partitions/clients/``, fit each locally for
``local_epochs`` (a Lightning fit, client learning rate decaying over the rounds; FedProx adds
a proximal term), drop clients that fail or time out, reject non-finite or too-large updates,
aggregate the rest (``federate.aggregator``; DP-FedAvg with ``federate.dp``), apply it with
the server optimizer (FedAdam or plain), score on val. With DP, the ε of the run is checked
against the privacy ledger before training starts (``privacy.max_epsilon``) and recorded in
it afterwards. Writes ``models/federate/model.{safetensors,json}`` (the final classifier),
``rounds.csv`` (one row per round) and ``reports/federate.json``.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import FederateParams, Params
from pipelines.errors import GateError
from pipelines.federated.privacy import DATA_TAG, EPSILON_METRIC
from pipelines.federated.sites import check_site_data, expected_data
from pipelines.io import (
    ImageTable,
    Paths,
    TableStream,
    atomic_outputs,
    content_sha256,
    read_client_shards_within_budget,
    read_image_table,
    save_weights,
    table_rows,
    union_sha256,
    write_json,
)
from pipelines.tracking import StageTracker

if TYPE_CHECKING:
    from pipelines.models.encoder import Classifier, Encoder

log = logging.getLogger(__name__)


def federate(
    encoder: Encoder,
    clients: list[ImageTable | TableStream],
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
    from pipelines.federated.fedavg import (
        init_head_from_class_means,
        run_federation,
        start_classifier,
    )

    model = start_classifier(encoder, val.num_classes, seed)
    state = init_head_from_class_means(model.config, model.state_dict(), clients, device)
    return run_federation(model.config, state, clients, val, p, seed, device, on_round)


ROUND_COLUMNS = ("round", "val_accuracy", "train_loss", "accepted", "rejected", "dropped")


def federate_on_flower(
    encoder: Encoder,
    shards: list[Path],
    val_path: Path,
    p: FederateParams,
    seed: int,
    device: str,
    work_dir: Path,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Classifier, list[dict[str, float]]]:
    """The same federation on Flower's deployment engine, over a loopback deployment.

    Starts a SuperLink and one SuperNode per shard on this machine
    (:class:`~pipelines.federated.flower_deploy.LoopbackDeployment`), submits the Flower
    app with a run spec in ``work_dir`` and reads back the model and per-round history the
    ServerApp wrote. The start model is built exactly as :func:`federate` builds it; the
    class-mean head is set on the server from the SuperNodes' statistics. ``on_round(round,
    row)`` is called for each round as the ServerApp finishes it (read from its progress
    file while the run goes).
    """
    import json

    from pipelines.federated.fedavg import start_classifier
    from pipelines.federated.flower_deploy import (
        APP_DIR,
        PROGRESS_FILE,
        SECAGG_APP_DIR,
        LoopbackDeployment,
        ProgressTail,
        run_flower_job,
    )
    from pipelines.models.encoder import load_classifier

    val = read_image_table(val_path)
    model = start_classifier(encoder, val.num_classes, seed)
    save_weights(model, work_dir, model.config, name="start")
    spec = {
        "expected": expected_data(val),
        "federate": p.model_dump(mode="json"),
        "seed": seed,
        "device": device,
        "model_config": model.config,
        "initial": str(work_dir / "start.safetensors"),
        "val": str(Path(val_path).resolve()),
        "out": str(work_dir / "out"),
        "num_clients": len(shards),
    }
    (work_dir / "spec.json").write_text(json.dumps(spec))
    with LoopbackDeployment(shards, work_dir / "home") as deployment:
        log.info("Flower deployment up: SuperLink + %d SuperNodes on 127.0.0.1", len(shards))
        app_dir = SECAGG_APP_DIR if p.secure_aggregation else APP_DIR
        tail = ProgressTail(
            work_dir / "out" / PROGRESS_FILE,
            lambda row: on_round(int(row["round"]), row) if on_round else None,
        )
        run_flower_job(deployment, work_dir / "spec.json", app_dir=app_dir, on_poll=tail.poll)
    history = json.loads((work_dir / "out" / "history.json").read_text())
    for row in history[tail.seen :]:  # rows no progress line reported (SecAgg+ writes none)
        if on_round is not None:
            on_round(int(row["round"]), row)
    return load_classifier(work_dir / "out"), history


def write_rounds(path: Path, history: list[dict[str, float]]) -> None:
    """One CSV row per round: ``round,val_accuracy,train_loss,accepted,rejected,dropped``
    and ``epsilon`` when the run is private."""
    private = any("epsilon" in row for row in history)
    columns = [*ROUND_COLUMNS, "epsilon"] if private else list(ROUND_COLUMNS)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in history:
            writer.writerow(
                [
                    f"{row[c]:.6f}" if isinstance(row.get(c), float) else int(row.get(c, 0))
                    for c in columns
                ]
            )


def check_privacy_budget(
    params: Params, tracker: StageTracker, data_sha256: str, num_clients: int
) -> tuple[float, float]:
    """``(ε spent before, ε this run will spend)``; raises when the ledger refuses the run."""
    from pipelines.federated.fedavg import planned_rounds
    from pipelines.federated.privacy import check_budget, spent_epsilon

    _, _, planned = planned_rounds(params.federate, num_clients)
    if params.privacy.max_epsilon is None and not params.federate.dp.enabled:
        return 0.0, planned  # no budget to check, nothing to record
    experiment = tracker.client.get_run(tracker.run_id).info.experiment_id
    spent = spent_epsilon(tracker.client, [experiment], data_sha256)
    check_budget(spent, planned, params.privacy.max_epsilon, data_sha256)
    return spent, planned


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """FedAvg from the pretrained encoder; write models/federate and its report."""
    from pipelines.models.encoder import load_encoder

    p = params.federate
    encoder = load_encoder(paths.model_dir("pretrain"))
    shard_tables = read_client_shards_within_budget(
        paths.partitions, params.common.memory_budget_mb
    )
    shards = [path for path, _ in shard_tables]
    clients = [table for _, table in shard_tables]
    val_path = paths.partitions / "val.parquet"
    val = read_image_table(val_path)
    expected = expected_data(val)
    for path, table in shard_tables:
        check_site_data(table, expected, str(path))
    data_sha256 = union_sha256(clients, val.num_classes)
    tracker.log_dataset("clients", paths.partitions / "clients", data_sha256, "training")
    tracker.log_dataset("val", val_path, content_sha256(val), "validation")
    spent_before, planned_epsilon = check_privacy_budget(params, tracker, data_sha256, len(clients))
    if p.dp.enabled:
        log.info(
            "DP-FedAvg: clip %g, noise multiplier %g, delta %g: this run spends epsilon %.4g "
            "(ledger for this data: %.4g spent before)",
            p.dp.clip_norm,
            p.dp.noise_multiplier,
            p.dp.delta,
            planned_epsilon,
            spent_before,
        )

    def on_round(round_index: int, row: dict[str, float]) -> None:
        per_round = {
            "round_val_accuracy": row["val_accuracy"],
            "round_train_loss": row["train_loss"],
            "round_accepted_clients": row["accepted"],
            "round_left_out_clients": row["rejected"] + row["dropped"],
        }
        if "epsilon" in row:
            per_round["round_epsilon"] = row["epsilon"]
        tracker.log_metrics(per_round, step=round_index)
        log.info(
            "round %d/%d val_accuracy=%.4f train_loss=%.4f clients %d/%d%s",
            round_index,
            p.rounds,
            row["val_accuracy"],
            row["train_loss"],
            row["accepted"],
            row["clients"],
            f" epsilon={row['epsilon']:.4g}" if "epsilon" in row else "",
        )

    log.info(
        "%s (aggregator %s) over %d clients (%s rows), %d rounds",
        p.strategy,
        p.aggregator,
        len(clients),
        "/".join(str(table_rows(t)) for t in clients),
        p.rounds,
    )
    if any(isinstance(t, TableStream) for t in clients):
        log.info("client shards over common.memory_budget_mb: read from disk in chunks")
    start = time.perf_counter()
    if p.runtime == "flower":
        import tempfile

        (paths.root / ".lepton").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="flower-", dir=paths.root / ".lepton") as tmp:
            model, history = federate_on_flower(
                encoder,
                shards,
                val_path,
                p,
                params.common.seed,
                params.common.device,
                Path(tmp),
                on_round,
            )
    else:
        model, history = federate(
            encoder, clients, val, p, params.common.seed, params.common.device, on_round
        )
    if not history:
        raise GateError(
            f"federate.dp.target_epsilon {p.dp.target_epsilon:g} allows no round at noise "
            f"multiplier {p.dp.noise_multiplier:g}; raise the target or the noise"
        )
    seconds = time.perf_counter() - start
    metrics = {
        "val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": max(row["val_accuracy"] for row in history),
        "rounds": len(history),
        "clients": len(clients),
        "left_out_updates": sum(row["rejected"] + row["dropped"] for row in history),
        "seconds": seconds,
        "samples_per_s": sum(row["samples"] for row in history) / seconds,
        "dp": int(p.dp.enabled),
    }
    if p.dp.enabled:
        metrics["epsilon"] = history[-1]["epsilon"]
        metrics["delta"] = p.dp.delta
        metrics["ledger_epsilon_total"] = spent_before + history[-1]["epsilon"]

    out = paths.model_dir("federate")
    with atomic_outputs(dirs=[out], files=[paths.report("federate")]) as staged:
        save_weights(model, staged.path(out), model.config, name="model")
        write_rounds(staged.path(out) / "rounds.csv", history)
        write_json(staged.path(paths.report("federate")), metrics)
    tracker.log_metrics(metrics)
    if p.dp.enabled:
        # the ledger entry: this run's ε on this data version (see pipelines.federated.privacy)
        tracker.log_metrics({EPSILON_METRIC: metrics["epsilon"]})
        tracker.set_tags({DATA_TAG: data_sha256})
    tracker.log_artifact(out, "federate")
    return metrics
