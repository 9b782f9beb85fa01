"""The one place that talks to MLflow.

Layout: one pipeline run is one MLflow parent run, tagged ``lepton.pipeline_run`` with a key
that all its stages share; each stage is a nested child run with its params, metrics,
datasets and artifacts. The key is, in order: ``$LEPTON_PIPELINE_RUN`` (set by the Airflow
DAG to the dag run id, and by ``lepton run``), the enclosing ``dvc repro`` process (so one
``dvc repro`` is one parent run), or a fresh key for a lone ``lepton stage run``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipelines.data_history import data_change

PIPELINE_TAG = "lepton.pipeline_run"
KIND_TAG = "lepton.kind"


def tracking_uri(root: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the workspace's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def artifact_root(root: Path) -> str | None:
    """Where new experiments keep artifacts: ``mlartifacts/`` beside a SQLite store's file
    (the workspace's own, or the main workspace's for a run workspace); for a tracking
    server (``http(s)://``), ``None``: the server's own artifact store (``mlflow server
    --artifacts-destination``), so a worker without the workspace can log."""
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        return None
    if database := sqlite_database(uri):
        return (database.parent / "mlartifacts").resolve().as_uri()
    return (root / "mlartifacts").resolve().as_uri()


def sqlite_database(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI, or ``None`` for another store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def client(root: Path):
    """An MlflowClient on the workspace store (quiet about its own migrations).

    On a SQLite store the first use creates or migrates its tables, and MLflow's migration
    is not safe against another process doing the same (``table _alembic_tmp_runs already
    exists``): so each process opens the store under :func:`sqlite_store_lock`. Later
    writes are safe side by side: MLflow gives every SQLite session a 20 s busy timeout.
    """
    import logging

    from mlflow import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    uri = tracking_uri(root)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    with sqlite_store_lock(uri):
        mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        mlflow_client.search_experiments(max_results=1)  # creates / migrates the tables
        mlflow_client.search_registered_models(max_results=1)
    return mlflow_client


@contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside the SQLite file of ``uri`` (``<file>.lock``, ``flock``:
    the kernel drops it when its holder dies, so a killed process never blocks the next)."""
    import fcntl

    database = sqlite_database(uri)
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# MLflow 3's UI opens an experiment without this tag on its GenAI (traces) overview; with
# it, on the runs and models of model training
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def experiment_id(mlflow_client, name: str, root: Path) -> str:
    """Id of experiment ``name``, created with the workspace artifact root if missing, and
    marked as a model-training experiment (unless someone marked it otherwise)."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow_client.create_experiment(
                name,
                artifact_location=artifact_root(root),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
            )
        except Exception:  # created meanwhile by another process
            found = mlflow_client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in found.tags:
        mlflow_client.set_experiment_tag(
            found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
        )
    return found.experiment_id


def pipeline_run_key() -> str:
    """The key that groups stage runs into one pipeline run (see module docstring)."""
    if key := os.environ.get("LEPTON_PIPELINE_RUN"):
        return key
    try:
        import psutil

        process = psutil.Process().parent()
        while process is not None:
            args = process.cmdline()
            names = [Path(a).name for a in args]
            if "dvc" in names and any(cmd in names for cmd in ("repro", "exp")):
                return f"dvc-{process.pid}-{int(process.create_time())}"
            process = process.parent()
    except Exception:  # noqa: BLE001 - no process info: fall back to a fresh key
        pass
    return f"standalone-{uuid.uuid4().hex[:12]}"


def git_commit(root: Path) -> str:
    """HEAD of the workspace's git repository, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_lock_sha256(root: Path) -> str:
    """sha256 of dvc.lock as it stands (the data versions the run used), or 'none'."""
    lock = root / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none"


def lineage_tags(root: Path) -> dict[str, str]:
    """Tags that lead from a run back to code and data."""
    tags = {"lepton.git_commit": git_commit(root), "lepton.dvc_lock_sha256": dvc_lock_sha256(root)}
    if dag_run := os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"):
        tags["airflow.dag_run_id"] = dag_run
    if dag := os.environ.get("AIRFLOW_CTX_DAG_ID"):
        tags["airflow.dag_id"] = dag
    return tags


def find_or_create_parent(mlflow_client, exp_id: str, key: str, root: Path) -> str:
    """Run id of the pipeline's parent run for ``key``, creating it on first use."""
    found = mlflow_client.search_runs(
        [exp_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{key}' and tags.`{KIND_TAG}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = mlflow_client.create_run(
        exp_id,
        run_name=f"pipeline {key}",
        tags={PIPELINE_TAG: key, KIND_TAG: "pipeline", **lineage_tags(root)},
    )
    return run.info.run_id


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


class StageTracker:
    """Logs one stage's params, metrics, datasets and artifacts to its child run."""

    def __init__(self, mlflow_client, run_id: str, parent_run_id: str, root: Path):
        self.client = mlflow_client
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.root = root

    def log_params(self, params: dict[str, Any]) -> None:
        """Log a (nested) params mapping, flattened to ``section.key``."""
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        _flatten("", params, flat)
        items = [Param(k, v) for k, v in flat.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log numeric metrics in one call (non-numbers are ignored)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [
            Metric(k, float(v), stamp, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder to the child run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, name: str, path: str | Path, digest: str, context: str) -> None:
        """Record a dataset input with its content hash as digest (``log_input``)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        source = resolve_dataset_source(Path(path).resolve().as_uri())
        dataset = MetaDataset(source=source, name=name, digest=digest[:36])
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [tag])]
        )

    def set_tags(self, tags: dict[str, str], on_parent: bool = False) -> None:
        """Set tags on the child run (or on the pipeline's parent run)."""
        target = self.parent_run_id if on_parent else self.run_id
        for key, value in tags.items():
            self.client.set_tag(target, key, str(value))


def end_killed_attempts(mlflow_client, exp_id: str, key: str, stage: str) -> None:
    """Mark KILLED the runs of ``stage`` in pipeline run ``key`` still RUNNING: an attempt
    that was killed (an Airflow retry follows it) could not end its own run."""
    stale = mlflow_client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`{PIPELINE_TAG}` = '{key}' and tags.`lepton.stage` = '{stage}'"
            " and attributes.status = 'RUNNING'"
        ),
    )
    for run in stale:
        mlflow_client.set_tag(run.info.run_id, "lepton.ended", "killed; a later attempt took over")
        mlflow_client.set_terminated(run.info.run_id, status="KILLED")


@contextmanager
def stage_run(stage: str, root: Path, experiment: str) -> Iterator[StageTracker]:
    """Open the child run of ``stage`` under the pipeline's parent run.

    The parent run is (re)marked RUNNING while the stage runs and ends with the stage's
    status, so the MLflow UI shows whether the last stage of the pipeline run succeeded.
    After a stage succeeds, the parent is tagged with the run's data against the previous
    run's (``lepton.data_status`` new / unchanged / first, rows, sha256; see
    :func:`pipelines.data_history.data_change`).
    """
    mlflow_client = client(root)
    exp_id = experiment_id(mlflow_client, experiment, root)
    key = pipeline_run_key()
    parent_id = find_or_create_parent(mlflow_client, exp_id, key, root)
    mlflow_client.update_run(parent_id, status="RUNNING")
    end_killed_attempts(mlflow_client, exp_id, key, stage)
    child = mlflow_client.create_run(
        exp_id,
        run_name=stage,
        tags={
            "mlflow.parentRunId": parent_id,
            PIPELINE_TAG: key,
            KIND_TAG: "stage",
            "lepton.stage": stage,
            **lineage_tags(root),
        },
    )
    tracker = StageTracker(mlflow_client, child.info.run_id, parent_id, root)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
        if change := data_change(root, key):
            tracker.set_tags(change.tags(), on_parent=True)
    finally:
        mlflow_client.set_terminated(child.info.run_id, status=status)
        mlflow_client.set_tag(parent_id, "lepton.dvc_lock_sha256", dvc_lock_sha256(root))
        mlflow_client.set_terminated(parent_id, status=status)
