"""Airflow wiring: the environment for a workspace and one operator per stage.

Imported by the DAG file at parse time, so it imports nothing heavy: Airflow operators are
imported inside the functions that build them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pipelines.config import RuntimeParams, read_params_mapping, validate_params
from pipelines.errors import ConfigError
from pipelines.registry import Stage

DAG_ID = "lepton_pipeline"
PIPELINE_RUN_TEMPLATE = "{{ (dag_run.conf or {}).get('pipeline_run') or run_id }}"


def workspace_root() -> Path:
    """The workspace: ``$LEPTON_WORKSPACE``, else the folder above ``dags/`` and ``pipelines/``."""
    if env := os.environ.get("LEPTON_WORKSPACE"):
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def airflow_env(root: Path) -> dict[str, str]:
    """Environment that points Airflow at the workspace: SQLite metadata in ``.airflow/``."""
    home = root / ".airflow"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # `make airflow` should run the DAG on its schedule without a manual unpause.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "LEPTON_WORKSPACE": str(root),
    }


@dataclass(frozen=True)
class DagSettings:
    """What the DAG needs from params.yaml's ``runtime`` section and the workspace.

    ``problem`` is the error that params.yaml gives, if any. The DAG still parses: with the
    ``runtime`` section when that part is valid, else with the defaults, and says so in its
    doc. Its first task then fails on the same message.
    """

    root: Path
    runtime: RuntimeParams
    problem: str | None = None
    runtime_is_default: bool = False

    @property
    def scale_out(self) -> bool:
        """Each task in its own checkout (``runtime.workspace: per_task``)."""
        return self.runtime.workspace == "per_task"

    @property
    def max_active_tasks(self) -> int:
        """1 while the run's tasks share a workspace; ``runtime.max_active_tasks`` in the
        scale-out mode."""
        return self.runtime.max_active_tasks if self.scale_out else 1

    @property
    def retry_delay(self) -> timedelta:
        return timedelta(seconds=self.runtime.retry_delay_seconds)

    def doc_note(self) -> str:
        """Markdown for the DAG doc: empty when params.yaml is valid."""
        if self.problem is None:
            return ""
        fallback = (
            "The DAG uses the default `runtime:` settings until it is fixed."
            if self.runtime_is_default
            else "The DAG's own `runtime:` settings are valid and in use."
        )
        return (
            "\n\n#### params.yaml has a problem\n\n"
            f"`{self.problem}`\n\n{fallback} The first task (ingest) fails with this message "
            "until params.yaml is fixed.\n"
        )


def dag_settings(root: Path | None = None) -> DagSettings:
    """The DAG's settings from params.yaml; never raises on a bad file (see DagSettings)."""
    root = root or workspace_root()
    path = root / "params.yaml"
    try:
        raw = read_params_mapping(path)
    except ConfigError as exc:
        return DagSettings(root, RuntimeParams(), str(exc), runtime_is_default=True)
    try:
        return DagSettings(root, validate_params(raw, source=str(path)).runtime)
    except ConfigError as exc:
        problem = str(exc)
    try:
        runtime = validate_params({"runtime": raw.get("runtime") or {}}, source=str(path)).runtime
    except ConfigError:
        return DagSettings(root, RuntimeParams(), problem, runtime_is_default=True)
    return DagSettings(root, runtime, problem)


def stage_command(stage: Stage, python: str = "python") -> str:
    """The one command every runtime uses for a stage (see ``pipelines/stage_task.py``).

    It runs ``dvc repro --single-item <stage>``, so DVC skips the stage when nothing changed,
    unless ``dvc status`` at the start of this DAG run already found the stage up to date.
    ingest's run also runs the source probe first, which re-hashes the source files and
    validates params.yaml, so the first task fails on a bad params.yaml, naming the key.
    """
    return f"{python} -m pipelines.stage_task {stage.name}"


def task_environment(root: Path, workspace_mode: str = "shared") -> dict[str, str]:
    """Variables every stage task gets: the pipeline run key, the workspace and whether
    the run works in it or in a workspace of its own (``runtime.workspace``); for the
    scale-out mode, the run's commit and overrides from its conf."""
    return {
        "LEPTON_COMMIT": "{{ (dag_run.conf or {}).get('commit') or '' }}",
        "LEPTON_OVERRIDES": "{{ ((dag_run.conf or {}).get('overrides') or []) | tojson }}",
        "LEPTON_PIPELINE_RUN": PIPELINE_RUN_TEMPLATE,
        "LEPTON_WORKSPACE": str(root),
        # a run's conf may say where it works (`lepton run` passes "shared": it holds the lock)
        "LEPTON_WORKSPACE_MODE": "{{ (dag_run.conf or {}).get('workspace') or '"
        + workspace_mode
        + "' }}",
        "LEPTON_TASK_TRY": "{{ ti.try_number }}",
        "AIRFLOW_CTX_DAG_RUN_ID": "{{ run_id }}",
        "AIRFLOW_CTX_DAG_ID": "{{ dag.dag_id }}",
        "PYTHONUNBUFFERED": "1",
    }


def make_local_task(stage: Stage, settings: DagSettings):
    """A BashOperator running the stage's command with the workspace's Python and DVC."""
    from airflow.providers.standard.operators.bash import BashOperator

    bin_dir = str(Path(sys.executable).parent)
    env = {
        **task_environment(settings.root, settings.runtime.workspace),
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "LEPTON_DVC": str(Path(bin_dir) / "dvc"),
    }
    return BashOperator(
        task_id=stage.name,
        bash_command=stage_command(stage, python=sys.executable),
        cwd=str(settings.root),
        env=env,
        append_env=True,
        execution_timeout=timedelta(minutes=stage.timeout_minutes),
        doc_md=stage.description,
        **gpu_placement(stage, settings),
    )


def gpu_placement(stage: Stage, settings: DagSettings) -> dict[str, str]:
    """``pool`` and ``queue`` of a GPU stage's task (``runtime.gpu_pool`` / ``gpu_queue``):
    the pool's slots bound how many run at once, the Celery queue sends them to the
    workers with GPUs. Nothing for the other stages."""
    if not stage.needs_gpu:
        return {}
    runtime = settings.runtime
    placement = {"pool": runtime.gpu_pool, "queue": runtime.gpu_queue}
    return {k: v for k, v in placement.items() if v}


def make_final_lock_task(settings: DagSettings):
    """The scale-out run's last task: one dvc.lock from every stage task's entry
    (:func:`pipelines.scale_out.finalize`)."""
    from airflow.providers.standard.operators.bash import BashOperator

    from pipelines.scale_out import FINAL_TASK

    bin_dir = str(Path(sys.executable).parent)
    env = {
        **task_environment(settings.root, settings.runtime.workspace),
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "LEPTON_DVC": str(Path(bin_dir) / "dvc"),
    }
    return BashOperator(
        task_id=FINAL_TASK,
        bash_command=f"{sys.executable} -m pipelines.stage_task {FINAL_TASK}",
        cwd=str(settings.root),
        env=env,
        append_env=True,
        execution_timeout=timedelta(minutes=30),
        doc_md="Writes the run's dvc.lock from every stage task's entry in the DVC remote.",
    )


def make_docker_task(stage: Stage, settings: DagSettings):
    """A DockerOperator running the same command in the GPU image, workspace bind-mounted.

    The workspace is mounted at the same path as on the host so that paths recorded by
    MLflow and DVC mean the same thing inside and outside the container.
    """
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import DeviceRequest, Mount

    runtime = settings.runtime
    root = str(settings.root)
    return DockerOperator(
        task_id=stage.name,
        image=runtime.docker_image,
        command=["bash", "-c", stage_command(stage)],
        working_dir=root,
        mounts=[Mount(source=root, target=root, type="bind")],
        device_requests=[DeviceRequest(count=runtime.docker_gpus, capabilities=[["gpu"]])],
        environment=task_environment(settings.root, settings.runtime.workspace),
        network_mode=runtime.docker_network_mode,
        **gpu_placement(stage, settings),
        auto_remove="success",
        mount_tmp_dir=False,
        execution_timeout=timedelta(minutes=stage.timeout_minutes),
        doc_md=stage.description,
    )


def make_stage_task(stage: Stage, settings: DagSettings):
    """DockerOperator for GPU stages when ``runtime.executor`` is docker, else BashOperator."""
    if settings.runtime.executor == "docker" and stage.needs_gpu:
        return make_docker_task(stage, settings)
    return make_local_task(stage, settings)
