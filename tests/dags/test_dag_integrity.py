"""DAG integrity: it imports cleanly and cheaply, and its graph is the registry's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import RuntimeParams
from pipelines.dvc_render import render_dvc_yaml
from pipelines.orchestration import DagSettings, make_stage_task
from pipelines.registry import SOURCE_PROBE, STAGE_NAMES, STAGES, get_stage, upstream_of
from pipelines.stage_task import repro_argv
from tests.conftest import REPO, make_workspace, workspace_env


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    from pipelines.orchestration import airflow_env

    home = tmp_path_factory.mktemp("airflow")
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in airflow_env(home).items() if k != "LEPTON_WORKSPACE"})
    yield home
    os.environ.clear()
    os.environ.update(saved)


def load_dag(root: Path):
    from airflow.dag_processing.dagbag import DagBag

    previous = os.environ.get("LEPTON_WORKSPACE")
    os.environ["LEPTON_WORKSPACE"] = str(root)
    try:
        bag = DagBag(dag_folder=str(root / "dags"))
    finally:
        if previous is None:
            os.environ.pop("LEPTON_WORKSPACE", None)
        else:
            os.environ["LEPTON_WORKSPACE"] = previous
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["lepton_pipeline"]


def test_dag_tasks_and_edges_equal_the_registry(airflow_home):
    dag = load_dag(REPO)
    assert sorted(dag.task_ids) == sorted(STAGE_NAMES)
    for stage in STAGES:
        task = dag.get_task(stage.name)
        assert task.upstream_task_ids == set(upstream_of(stage.name)), stage.name


def test_every_task_has_retries_timeout_and_the_dvc_command(airflow_home):
    dag = load_dag(REPO)
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id
        assert task.retry_exponential_backoff
        assert task.execution_timeout is not None and task.execution_timeout.total_seconds() > 0
        assert task.bash_command == f"{sys.executable} -m pipelines.stage_task {task.task_id}"
        assert task.cwd == str(REPO)
        assert "LEPTON_PIPELINE_RUN" in task.env
        assert task.env["LEPTON_DVC"].endswith("/dvc")
        assert "try_number" in task.env["LEPTON_TASK_TRY"]


def test_dag_settings(airflow_home):
    dag = load_dag(REPO)
    assert dag.max_active_runs == 1
    assert dag.max_active_tasks == 1
    assert dag.catchup is False
    assert "lepton" in dag.tags
    assert dag.doc_md and "dvc repro" in dag.doc_md


def test_docker_executor_makes_gpu_stages_docker_operators(airflow_home, tmp_path):
    root = make_workspace(
        tmp_path / "ws", {"runtime": {"executor": "docker", "docker_image": "lepton:test"}}
    )
    dag = load_dag(root)
    for stage in STAGES:
        task = dag.get_task(stage.name)
        if stage.needs_gpu:
            assert type(task).__name__ == "DockerOperator", stage.name
            assert task.image == "lepton:test"
            assert task.command == ["bash", "-c", f"python -m pipelines.stage_task {stage.name}"]
        else:
            assert type(task).__name__ == "BashOperator", stage.name


def test_docker_operator_arguments_mount_workspace_and_request_gpus(airflow_home, tmp_path):
    settings = DagSettings(root=tmp_path, runtime=RuntimeParams(executor="docker", docker_gpus=2))
    task = make_stage_task(get_stage("federate"), settings)
    assert [(m["Source"], m["Target"], m["Type"]) for m in task.mounts] == [
        (str(tmp_path), str(tmp_path), "bind")
    ]
    assert task.working_dir == str(tmp_path)
    [request] = task.device_requests
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]
    assert task.environment["LEPTON_WORKSPACE"] == str(tmp_path)
    assert "pipeline_run" in task.environment["LEPTON_PIPELINE_RUN"]
    assert task.auto_remove == "success"


def test_workspace_mode_comes_from_params_and_a_run_conf_can_override_it(airflow_home, tmp_path):
    from types import SimpleNamespace

    import jinja2

    root = make_workspace(tmp_path / "ws", {"runtime": {"workspace": "per_run"}})
    template = load_dag(root).get_task("federate").env["LEPTON_WORKSPACE_MODE"]

    def render(conf):
        return jinja2.Template(template).render(dag_run=SimpleNamespace(conf=conf))

    assert render(None) == "per_run"
    assert render({"pipeline_run": "x"}) == "per_run"
    assert render({"workspace": "shared"}) == "shared"  # what `lepton run` passes


def test_scale_out_dag_runs_branches_at_once_and_ends_with_the_lock_task(airflow_home, tmp_path):
    from types import SimpleNamespace

    import jinja2

    runtime = {
        "workspace": "per_task",
        "max_active_tasks": 3,
        "gpu_pool": "gpu",
        "gpu_queue": "gpu",
    }
    dag = load_dag(make_workspace(tmp_path / "ws", {"runtime": runtime}))
    assert dag.max_active_tasks == 3
    assert sorted(dag.task_ids) == sorted([*STAGE_NAMES, "dvc_lock"])
    assert dag.get_task("dvc_lock").upstream_task_ids == set(STAGE_NAMES)
    for stage in STAGES:
        task = dag.get_task(stage.name)
        assert task.upstream_task_ids == set(upstream_of(stage.name)), stage.name
        if stage.needs_gpu:
            assert (task.pool, task.queue) == ("gpu", "gpu"), stage.name
        else:
            assert task.pool == "default_pool" and task.queue != "gpu", stage.name
    # quantum and optimize both need only federate's outputs: they may run side by side
    assert not {"quantum", "optimize"} & (
        dag.get_task("quantum").upstream_task_ids | dag.get_task("optimize").upstream_task_ids
    )
    env = dag.get_task("pretrain").env
    conf = SimpleNamespace(conf={"commit": "abc123", "overrides": ["federate.rounds=2"]})
    keys = ("LEPTON_COMMIT", "LEPTON_OVERRIDES", "LEPTON_WORKSPACE_MODE")
    render = {k: jinja2.Template(env[k]).render(dag_run=conf) for k in keys}
    assert render["LEPTON_COMMIT"] == "abc123"
    assert render["LEPTON_OVERRIDES"] == '["federate.rounds=2"]'
    assert render["LEPTON_WORKSPACE_MODE"] == "per_task"


def test_shared_workspace_dag_runs_one_task_at_a_time(airflow_home):
    assert load_dag(REPO).max_active_tasks == 1


def test_cpu_stage_stays_local_with_docker_executor(airflow_home, tmp_path):
    settings = DagSettings(root=tmp_path, runtime=RuntimeParams(executor="docker"))
    assert type(make_stage_task(get_stage("ingest"), settings)).__name__ == "BashOperator"


def test_dag_file_imports_nothing_heavy():
    code = (
        "import sys, runpy; runpy.run_path('dags/lepton_pipeline.py');"
        "heavy = [m for m in ('torch', 'lightning', 'pytorch_lightning', 'mlflow', 'qiskit',"
        " 'sklearn') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_committed_dvc_yaml_matches_the_registry():
    assert (REPO / "dvc.yaml").read_text() == render_dvc_yaml()


def test_ingest_task_runs_the_source_probe_first():
    assert repro_argv(get_stage("ingest"), "dvc") == [
        "dvc", "repro", "--single-item", SOURCE_PROBE, "ingest"
    ]  # fmt: skip
    assert repro_argv(get_stage("compress"), "dvc") == ["dvc", "repro", "--single-item", "compress"]


def test_dag_parses_with_an_unknown_key_and_its_first_task_fails_naming_it(airflow_home, tmp_path):
    root = make_workspace(
        tmp_path / "ws", {"quantum": {"no_such_key": 1}, "runtime": {"retries": 4}}
    )
    dag = load_dag(root)
    assert sorted(dag.task_ids) == sorted(STAGE_NAMES)
    assert "quantum.no_such_key" in dag.doc_md
    assert dag.get_task("ingest").retries == 4  # its own runtime section is valid and used
    ingest = dag.get_task("ingest")
    done = subprocess.run(
        ["bash", "-c", ingest.bash_command],
        cwd=ingest.cwd,
        env={**workspace_env(root), **{k: v for k, v in ingest.env.items() if "{{" not in v}},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "quantum.no_such_key" in done.stdout + done.stderr
    assert not (root / "data" / "raw").exists()


@pytest.mark.parametrize(
    "text",
    ["common: [unclosed\n", "runtime:\n  retries: -3\n", "- just\n- a list\n"],
    ids=["not yaml", "bad runtime", "not a mapping"],
)
def test_dag_parses_on_default_runtime_when_params_yaml_is_unreadable(airflow_home, tmp_path, text):
    root = make_workspace(tmp_path / "ws")
    (root / "params.yaml").write_text(text)
    dag = load_dag(root)
    assert sorted(dag.task_ids) == sorted(STAGE_NAMES)
    assert "params.yaml has a problem" in dag.doc_md
    assert "default `runtime:` settings" in dag.doc_md
    assert dag.get_task("ingest").retries == RuntimeParams().retries


def test_valid_params_leave_the_dag_doc_without_a_warning(airflow_home):
    assert "params.yaml has a problem" not in load_dag(REPO).doc_md
