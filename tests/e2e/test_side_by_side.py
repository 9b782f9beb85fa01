"""Runs side by side: with different params, in one workspace and in a run's own workspace.

Three ``lepton run --via dvc`` at once on one tiny workspace:

- A, in the workspace, ``--set federate.rounds=3``;
- B, ``--isolated --set federate.rounds=1``, started once A has pretrained: its own
  workspace, sharing cache and MLflow; the stages before federate are restored from the
  cache, not computed again;
- C, in the workspace with no override, started while A holds the workspace: it waits,
  says so, and then finds every stage done.

All three finish, none prints a DVC lock error, each workspace keeps its own params and
outputs (3 rounds here, 1 there), and the one MLflow store holds each run's federate stage
with its own params. A DAG task with ``runtime.workspace: per_run`` works in the DAG run's
own workspace and leaves the main one untouched.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, TINY_OVERRIDES, make_workspace, workspace_env

pytestmark = pytest.mark.slow

DVC_LOCK_ERRORS = ("Unable to acquire lock", "is busy, it is being blocked by")


def start(root: Path, log: Path, *args: str) -> subprocess.Popen:
    """``lepton run --via dvc ARGS`` in ``root``, its output into ``log``."""
    return subprocess.Popen(
        [str(BIN / "lepton"), "run", "--via", "dvc", *args],
        cwd=root,
        env=workspace_env(root),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_for_text(log: Path, text: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.2)


def federate_runs(root: Path) -> dict[str, str]:
    """pipeline run key → federate.rounds of its federate stage run, from the main store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lepton")
    runs = client.search_runs([exp.experiment_id], "tags.`lepton.stage` = 'federate'")
    return {r.data.tags["lepton.pipeline_run"]: r.data.params["federate.rounds"] for r in runs}


def test_three_runs_at_once_queue_or_go_their_own_way(tiny_workspace, tmp_path):
    root = tiny_workspace
    logs = {name: tmp_path / f"{name}.log" for name in "abc"}
    a = start(root, logs["a"], "--set", "federate.rounds=3")
    wait_for_text(logs["a"], "Running `dvc repro`", a)  # A holds the workspace now
    c = start(root, logs["c"])
    # DVC has stored pretrain's outputs and lock entry once it starts the next stage
    full_log = Path(re.search(r"full log: (\S+)", logs["a"].read_text()).group(1))
    wait_for_text(full_log, "Running stage 'federate'", a, seconds=300)
    b = start(root, logs["b"], "--isolated", "--set", "federate.rounds=1")
    codes = {name: p.wait(timeout=900) for name, p in (("a", a), ("b", b), ("c", c))}
    texts = {name: log.read_text() for name, log in logs.items()}
    assert codes == {"a": 0, "b": 0, "c": 0}, {k: t[-3000:] for k, t in texts.items()}
    for text in texts.values():
        assert not any(error in text for error in DVC_LOCK_ERRORS), text[-3000:]
    assert "waiting for the workspace" in texts["c"] and "workspace free after" in texts["c"]
    assert "federate   cached" in texts["c"]  # A's outputs, nothing recomputed
    for stage in ("ingest", "compress", "partition", "pretrain"):
        assert f"{stage:<10} cached" in texts["b"], texts["b"][-2000:]
    assert "federate   ran" in texts["b"]

    work = next((root / ".lepton" / "workspaces").iterdir())
    assert yaml.safe_load((root / "params.yaml").read_text())["federate"]["rounds"] == 3
    assert yaml.safe_load((work / "params.yaml").read_text())["federate"]["rounds"] == 1
    assert json.loads((root / "reports" / "federate.json").read_text())["rounds"] == 3
    assert json.loads((work / "reports" / "federate.json").read_text())["rounds"] == 1
    rows_here = (root / "models" / "federate" / "rounds.csv").read_text().splitlines()
    rows_there = (work / "models" / "federate" / "rounds.csv").read_text().splitlines()
    assert (len(rows_here), len(rows_there)) == (1 + 3, 1 + 1)

    runs = federate_runs(root)  # B logged into the main workspace's store
    assert sorted(runs.values()) == ["1", "3"], runs
    assert not (work / "mlflow.db").exists() and not (work / "mlartifacts").exists()


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
