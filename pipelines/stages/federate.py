"""Federated fine-tuning of a classifier over the K client shards.

Starts from the pretrained encoder (``models/pretrain``) with a linear head set from federated
class means of its features (FedNCM), then runs ``federate.rounds`` rounds: sample
``client_fraction`` of the clients in ``data/partitions/clients/``, fit each locally for
``local_epochs`` (more on a shard too small for ``min_local_steps``; a Lightning fit, client
learning rate decaying over the rounds; FedProx adds a proximal term), drop clients that
fail or time out, reject non-finite or too-large updates, aggregate the rest
(``federate.aggregator``; DP-FedAvg with ``federate.dp``), apply it with the server
optimizer (FedAdam or plain), score on val. With DP, the ε of the run is checked
against the privacy ledger before training starts (``privacy.max_epsilon``) and recorded in
it afterwards. Writes ``models/federate/model.{safetensors,json}`` (the final classifier),
``rounds.csv`` (one row per round), ``sites.json`` (each site: name, rows and, for remote
sites, its score on its own held-out rows) and ``reports/federate.json``.

With ``federation.superlink`` set the clients are remote sites (``lepton site join``): no
shard is read here, the run goes to that SuperLink, and each site's metrics are logged as
``site.<name>.*``.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.checkpoints import open_stage_checkpoint
from pipelines.config import (
    ROWS_THAT_COST_CLIENTS_NO_PRIVACY,
    FederateParams,
    FederationParams,
    Params,
)
from pipelines.errors import ConfigError, GateError
from pipelines.federated.privacy import (
    CARRIED_TAG,
    DATA_TAG,
    DELTA_TAG,
    EPSILON_METRIC,
    UNIT_TAG,
    client_epsilon_key,
)
from pipelines.federated.sites import SITES_FILE, check_site_data, expected_data
from pipelines.io import (
    ImageTable,
    Paths,
    TableStream,
    atomic_outputs,
    content_sha256,
    read_client_shards_within_budget,
    read_image_table,
    read_json,
    save_weights,
    table_rows,
    union_sha256,
    write_json,
)
from pipelines.tracking import StageTracker

if TYPE_CHECKING:
    from pipelines.checkpoints import Checkpoint
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
    checkpoint: Checkpoint | None = None,
) -> tuple[Classifier, list[dict[str, float]]]:
    """FedAvg fine-tuning of ``encoder`` + a new linear head; returns ``(model, history)``.
    With a ``checkpoint`` each round is saved, and a saved run resumes after its last round.

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
    return run_federation(
        model.config, state, clients, val, p, seed, device, on_round, checkpoint=checkpoint
    )


ROUND_COLUMNS = ("round", "val_accuracy", "train_loss", "accepted", "rejected", "dropped")


def remote_data_key(superlink: str) -> str:
    """The privacy ledger's data key of a remote federation: the workspace never sees the
    sites' rows, so the key is the federation's address (sha256 of ``remote:<address>``)."""
    import hashlib

    return hashlib.sha256(f"remote:{superlink}".encode()).hexdigest()


def site_key(site: str) -> str:
    """A site's name as it may stand in an MLflow metric key."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(site))


def site_metrics(sites: list[dict]) -> dict[str, float]:
    """MLflow metrics of each site: ``site.<name>.rows`` and, where the site scored the
    final model on its held-out rows, ``site.<name>.holdout_accuracy`` and ``..._rows``.
    Under record-level DP the true row count is not released: ``site.<name>.rows_released``
    (the noisy count) and ``site.<name>.epsilon`` instead."""
    metrics: dict[str, float] = {}
    for entry in sites:
        name = site_key(entry["site"])
        if entry.get("rows") is not None:
            metrics[f"site.{name}.rows"] = float(entry["rows"])
        for key in ("rows_released", "epsilon"):
            if entry.get(key) is not None:
                metrics[f"site.{name}.{key}"] = float(entry[key])
        if entry.get("holdout_accuracy") is not None:
            metrics[f"site.{name}.holdout_accuracy"] = float(entry["holdout_accuracy"])
            metrics[f"site.{name}.holdout_rows"] = float(entry["holdout_rows"])
    return metrics


def federate_on_flower(
    encoder: Encoder,
    shards: list[Path],
    val_path: Path,
    p: FederateParams,
    federation: FederationParams,
    normalization: dict[str, float],
    seed: int,
    device: str,
    work_dir: Path,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    deployment=None,
    checkpoint: Checkpoint | None = None,
    site_state: Path | None = None,
) -> tuple[Classifier, list[dict[str, float]], list[dict]]:
    """The same federation on Flower's deployment engine: a loopback deployment over
    ``shards``, or the remote sites of ``federation`` (each reads its own files, scaled
    by ``normalization``, the run's pixel range).

    The start model is built exactly as :func:`federate` builds it and travels in the app
    bundle with the val table; the class-mean head is set on the server from the sites'
    statistics. ``on_round(round, row)`` is called for each round as the ServerApp
    finishes it (read from ``flwr log`` while the run goes). ``deployment``: an already
    started one to run on instead (tests). With a ``checkpoint`` the ServerApp's rounds are
    saved into it and a saved run resumes after its last round (under record-level DP each
    site goes on from the accountant it keeps on its disk: on loopback under
    ``site_state/<site>``). Returns ``(model, history, sites)``;
    ``sites`` has each site's name, rows, held-out rows and held-out accuracy.
    """
    from pipelines.federated.fedavg import start_classifier
    from pipelines.federated.flower_deploy import APP_DIR, run_federated_job, weights_blob
    from pipelines.models.encoder import load_classifier

    val = read_image_table(val_path)
    model = start_classifier(encoder, val.num_classes, seed)
    spec = {
        "expected": expected_data(val),
        "normalization": normalization,
        "federate": p.model_dump(mode="json"),
        "seed": seed,
        "device": device,
        "model_config": model.config,
        "remote": federation.remote,  # record-level DP: the sites draw their own noise
    }
    blobs = {
        "initial": weights_blob(model),
        "val": Path(val_path).read_bytes(),
    }
    result = run_federated_job(
        federation,
        shards,
        APP_DIR,
        spec,
        blobs,
        work_dir,
        lambda row: on_round(int(row["round"]), row) if on_round else None,
        deployment,
        checkpoint,
        site_state,
    )
    return load_classifier(work_dir / "out"), result["history"], result["sites"]


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
    params: Params,
    tracker: StageTracker,
    data_sha256: str,
    num_clients: int,
    carried: Collection[str] = (),
) -> tuple[float, float]:
    """``(ε spent before, ε this run will spend)``; raises when the ledger refuses the run.
    ``carried``: runs this one resumes (their rounds are in this run's ``ε``)."""
    from pipelines.federated.fedavg import planned_rounds
    from pipelines.federated.privacy import check_budget, spent_epsilon

    _, _, planned = planned_rounds(params.federate, num_clients)
    if params.privacy.max_epsilon is None and not params.federate.dp.enabled:
        return 0.0, planned  # no budget to check, nothing to record
    experiment = tracker.client.get_run(tracker.run_id).info.experiment_id
    spent = spent_epsilon(tracker.client, [experiment], data_sha256, carried)
    check_budget(spent, planned, params.privacy.max_epsilon, data_sha256)
    return spent, planned


def resumed_private_run(checkpoint: Checkpoint, tracker: StageTracker) -> dict[str, object]:
    """``{"owner", "round"}``: the MLflow run that saved ``checkpoint`` and the round this
    run resumes after, when that run did not finish (killed or failed: its rounds become
    this run's); else empty (no checkpoint, this run's own, a finished or unknown run)."""
    from mlflow.exceptions import MlflowException

    saved = checkpoint.saved_meta()
    owner = saved.get("owner") if saved is not None else None
    if owner is None or owner == tracker.run_id:
        return {}
    try:
        status = tracker.client.get_run(owner).info.status
    except MlflowException:  # another store's run: count it where it is
        return {}
    return {} if status == "FINISHED" else {"owner": owner, "round": int(saved["round"])}


def record_level(p: FederateParams) -> bool:
    """Whether the run protects records (``federate.dp.unit: record``) rather than clients."""
    return p.dp.enabled and p.dp.unit == "record"


def check_record_features(encoder, encoder_path: Path) -> None:
    """Refuse record-level DP on an encoder that was trained on client rows. The fixed
    scattering transform is learnt from no row; a SimCLR encoder qualifies only when its
    ``encoder.json`` says ``trained_on`` a public split or server-held rows (pretrain writes
    it from the partition manifest's ``unlabeled_source``)."""
    if encoder.config.get("kind") == "scattering":
        return
    trained_on = read_json(encoder_path).get("trained_on", "client rows (not recorded)")
    if trained_on not in ROWS_THAT_COST_CLIENTS_NO_PRIVACY:
        raise ConfigError(
            f"{encoder_path}: trained_on '{trained_on}': federate.dp.unit 'record' needs "
            "features that saw no client row; run pretrain with pretrain.method "
            "'scattering', or SimCLR on a public split (partition.public_fraction > 0)"
        )


def check_record_budgets(
    params: Params, tracker: StageTracker, shard_tables: list, carried: Collection[str] = ()
) -> tuple[dict[str, str], dict[str, float], float]:
    """``(hash → shard file, ε spent before per client hash, ε this run plans)`` for
    record-level DP; raises when a client would pass ``privacy.max_epsilon``. A remote
    federation's sites are one entry, keyed by its address (:func:`remote_data_key`): the
    run records the largest ``ε`` any of its sites reported. ``carried``: runs this one
    resumes."""
    from pipelines.federated.privacy import check_client_budgets, spent_epsilon_by_client
    from pipelines.federated.record_federation import plan_record_run

    planned = plan_record_run(params.federate).epsilon
    if params.federation.remote:  # the sites are not seen here: one key for the federation
        superlink = params.federation.superlink
        names = {remote_data_key(superlink): f"the sites of {superlink}"}
    else:
        names = {
            union_sha256([table], table_num_classes(table)): str(path)
            for path, table in shard_tables
        }
    experiment = tracker.client.get_run(tracker.run_id).info.experiment_id
    spent = spent_epsilon_by_client(tracker.client, [experiment], list(names), carried)
    check_client_budgets(spent, names, planned, params.privacy.max_epsilon)
    return names, spent, planned


def client_epsilons(
    client_files: dict[str, str], sites: list[dict], remote: bool
) -> dict[str, float]:
    """The ledger metrics of a record-level run: each client's ``ε`` under its data hash.
    ``sites`` are in shard order (in process: named by shard; on a loopback deployment:
    ``client_00i``); a remote federation's one key gets the largest ``ε`` of its sites."""
    hashes = list(client_files)
    if remote:
        return {client_epsilon_key(hashes[0]): max(e["epsilon"] for e in sites)}
    return {
        client_epsilon_key(sha): entry["epsilon"] for sha, entry in zip(hashes, sites, strict=True)
    }


def table_num_classes(table) -> int:
    """Classes of a table in memory or of a stream's layout."""
    return int(table.layout.num_classes if isinstance(table, TableStream) else table.num_classes)


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """FedAvg from the pretrained encoder; write models/federate and its report."""
    from pipelines.models.encoder import load_encoder

    p, federation = params.federate, params.federation
    encoder = load_encoder(paths.model_dir("pretrain"))
    val_path = paths.partitions / "val.parquet"
    val = read_image_table(val_path)
    expected = expected_data(val)
    if federation.remote:  # the sites hold the rows: nothing to read or hash here
        shard_tables = []
        data_sha256 = remote_data_key(federation.superlink)
        tracker.set_tags({"federation.superlink": federation.superlink})
    else:
        shard_tables = read_client_shards_within_budget(
            paths.partitions, params.common.memory_budget_mb
        )
        for path, table in shard_tables:
            check_site_data(table, expected, str(path))
        data_sha256 = union_sha256([t for _, t in shard_tables], val.num_classes)
        tracker.log_dataset("clients", paths.partitions / "clients", data_sha256, "training")
    shards = [path for path, _ in shard_tables]
    clients = [table for _, table in shard_tables]
    num_clients = federation.sites if federation.remote else len(clients)
    tracker.log_dataset("val", val_path, content_sha256(val), "validation")
    record = record_level(p)
    checkpoint = open_stage_checkpoint(paths.root, "federate", params, tracker.run_id)
    # a run this one resumes: its rounds become this run's (the ledger counts them once)
    resumed = resumed_private_run(checkpoint, tracker) if p.dp.enabled else {}
    carried = {str(resumed["owner"])} if resumed else set()
    if record:
        check_record_features(encoder, paths.model_dir("pretrain") / "encoder.json")
        client_files, spent_by_client, planned_epsilon = check_record_budgets(
            params, tracker, shard_tables, carried
        )
        spent_before = max(spent_by_client.values(), default=0.0)
        log.info(
            "record-level DP: each client spends at most epsilon %.4g in this run (ledger: "
            "at most %.4g spent before by one client)",
            planned_epsilon,
            spent_before,
        )
    else:
        spent_before, planned_epsilon = check_privacy_budget(
            params, tracker, data_sha256, num_clients, carried
        )
    if p.dp.enabled and not record:
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
        for site, loss in row.get("site_losses", {}).items():  # Flower: each site's own loss
            per_round[f"site.{site_key(site)}.round_train_loss"] = loss
        tracker.log_metrics(per_round, step=round_index)
        if resumed and round_index == resumed["round"]:  # its rounds are logged here now
            if (saved := checkpoint.load()) is not None:
                checkpoint.save(*saved)  # owned by this run now: a later resume carries it
            tracker.client.set_tag(str(resumed["owner"]), CARRIED_TAG, tracker.run_id)
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
        "%s (aggregator %s) over %d clients (%s), %d rounds",
        p.strategy,
        p.aggregator,
        num_clients,
        "/".join(str(table_rows(t)) for t in clients) + " rows"
        if clients
        else f"rows at the sites of {federation.superlink}",
        p.rounds,
    )
    if any(isinstance(t, TableStream) for t in clients):
        log.info("client shards over common.memory_budget_mb: read from disk in chunks")
    start = time.perf_counter()
    if p.dp.enabled:  # in the ledger from its first round on, killed or not
        tracker.set_tags({DATA_TAG: data_sha256, UNIT_TAG: p.dp.unit, DELTA_TAG: str(p.dp.delta)})
        if record:
            tracker.log_metrics({client_epsilon_key(sha): 0.0 for sha in client_files})
    if p.runtime == "flower":
        import tempfile

        (paths.root / ".lepton").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="flower-", dir=paths.root / ".lepton") as tmp:
            model, history, sites = federate_on_flower(
                encoder,
                shards,
                val_path,
                p,
                federation,
                read_json(paths.partitions / "manifest.json")["normalization"],
                params.common.seed,
                params.common.device,
                Path(tmp),
                on_round,
                checkpoint=checkpoint,
                site_state=paths.root / ".lepton" / "sites",
            )
    elif record:
        from pipelines.federated.record_federation import run_record_federation

        model, history, released = run_record_federation(
            encoder,
            clients,
            [path.stem for path in shards],
            val,
            p,
            params.common.seed,
            params.common.device,
            on_round,
            checkpoint,
        )
        sites = [{**entry, "rows": None, "holdout_rows": 0} for entry in released]
    else:
        model, history = federate(
            encoder,
            clients,
            val,
            p,
            params.common.seed,
            params.common.device,
            on_round,
            checkpoint,
        )
        sites = [
            {"site": path.stem, "rows": table_rows(table), "holdout_rows": 0}
            for path, table in shard_tables
        ]
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
        "clients": num_clients,
        "left_out_updates": sum(row["rejected"] + row["dropped"] for row in history),
        "seconds": seconds,
        "samples_per_s": sum(row["samples"] for row in history) / seconds,
        "dp": int(p.dp.enabled),
        "dp_unit": p.dp.unit if p.dp.enabled else "none",
    }
    if p.dp.enabled:
        metrics["epsilon"] = history[-1]["epsilon"]
        metrics["delta"] = p.dp.delta
        metrics["ledger_epsilon_total"] = spent_before + history[-1]["epsilon"]

    out = paths.model_dir("federate")
    with atomic_outputs(dirs=[out], files=[paths.report("federate")]) as staged:
        save_weights(model, staged.path(out), model.config, name="model")
        write_rounds(staged.path(out) / "rounds.csv", history)
        write_json(staged.path(out) / SITES_FILE, sites)
        write_json(staged.path(paths.report("federate")), metrics)
    tracker.log_metrics(metrics)
    tracker.log_metrics(site_metrics(sites))
    for entry in sites:
        if entry.get("holdout_accuracy") is not None:
            log.info(
                "site %s: held-out accuracy %.4f on %d rows (trained on %d)",
                entry["site"],
                entry["holdout_accuracy"],
                entry["holdout_rows"],
                entry["rows"],
            )
    if p.dp.enabled:
        # the ledger entry: this run's ε on this data version (see pipelines.federated.privacy)
        tracker.log_metrics({EPSILON_METRIC: metrics["epsilon"]})  # its tags: set at start
    if record:  # and each client's own ε on its data version
        tracker.log_metrics(client_epsilons(client_files, sites, federation.remote))
    tracker.log_artifact(out, "federate")
    return metrics
