"""A DAG task with ``runtime.workspace: per_run`` works in the DAG run's own workspace.

(Runs at once in one workspace and ``lepton run --isolated`` beside ``dvc repro`` are in
tests/e2e/test_pipeline.py, ``test_dvc_repro_runs_then_skips_everything_and_pushes``.)
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import BIN, TINY_OVERRIDES, make_workspace, workspace_env

pytestmark = pytest.mark.slow


def test_a_dag_task_in_per_run_mode_works_in_the_runs_own_workspace(tmp_path):
    root = make_workspace(tmp_path / "ws", {**TINY_OVERRIDES, "runtime": {"workspace": "per_run"}})
    env = {
        **workspace_env(root),
        "LEPTON_PIPELINE_RUN": "scheduled__2026-12-06",
        "LEPTON_WORKSPACE_MODE": "per_run",
        "LEPTON_DVC": str(BIN / "dvc"),
    }
    done = subprocess.run(
        [str(BIN / "python"), "-m", "pipelines.stage_task", "ingest"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work = root / ".lepton" / "workspaces" / "scheduled__2026-12-06"
    assert f"run workspace of scheduled__2026-12-06: {work}" in done.stdout
    assert (work / "data" / "raw").exists() and (work / "dvc.lock").is_file()
    assert not (root / "data" / "raw").exists() and not (root / "dvc.lock").exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lepton")
    [ingest] = client.search_runs([exp.experiment_id], "tags.`lepton.stage` = 'ingest'")
    assert ingest.data.tags["lepton.pipeline_run"] == "scheduled__2026-12-06"
