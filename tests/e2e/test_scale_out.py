"""Scale-out mode, locally: tasks in clean checkouts on two "workers" sharing a DVC remote.

The project is a git repository; the only things the workers share are it (the git URL),
a local DVC remote and the MLflow store. Worker A runs ingest and compress, worker B
partition and pretrain, each task in a fresh clone (``runtime.workspace: per_task``, as the
DAG task command runs it). Checked:

- every output's hash equals the one a single-workspace ``dvc repro pretrain`` records;
- the final task's dvc.lock, written into a fresh clone, lets ``dvc pull`` restore every
  output byte for byte;
- a second DAG run with nothing changed restores every stage from the remote: no stage
  runs again;
- the tasks report the seconds they spent pulling and pushing;
- pretrain's first attempt, on worker A, is SIGKILLed once its checkpoint is in the remote;
  the retry on worker B (another checkout) resumes from it, and its outputs still equal
  the single workspace's, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO, TINY_OVERRIDES, make_workspace, workspace_env

pytestmark = pytest.mark.slow

STAGES_A = ("ingest", "compress")
STAGES_B = ("partition", "pretrain")
DVC_STAGES = ("ingest_source", "ingest", "compress", "partition", "pretrain")
# epochs enough to kill pretrain between its first checkpoint and its end
OVERRIDES = {**TINY_OVERRIDES, "pretrain": {**TINY_OVERRIDES["pretrain"], "epochs": 8}}


def task_env(key: str, worker: Path, project: Path, remote: Path, mlflow: str) -> dict:
    """The environment of a scale-out DAG task on ``worker`` (its task folders)."""
    worker.mkdir(parents=True, exist_ok=True)
    return {
        **workspace_env(project),
        "LEPTON_WORKSPACE_MODE": "per_task",
        "LEPTON_PIPELINE_RUN": key,
        "LEPTON_GIT_URL": str(project),
        "LEPTON_DVC_REMOTE_URL": str(remote),
        "LEPTON_TASK_DIR": str(worker),
        "LEPTON_DVC": str(BIN / "dvc"),
        "MLFLOW_TRACKING_URI": mlflow,
    }


def run_task(stage: str, key: str, worker: Path, project: Path, remote: Path, mlflow: str):
    """The DAG task of ``stage`` in scale-out mode on ``worker``; returns its output."""
    done = subprocess.run(
        [str(BIN / "python"), "-m", "pipelines.stage_task", stage],
        cwd=worker,
        env=task_env(key, worker, project, remote, mlflow),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (stage, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout


def kill_once_checkpointed(stage: str, key: str, worker: Path, project, remote, mlflow) -> int:
    """Start the task of ``stage`` on ``worker`` and SIGKILL it (the whole process group, as
    a lost worker) once its checkpoint is in the remote; the epoch it holds."""
    from pipelines.checkpoints import Checkpoint

    folder = remote / "lepton-runs" / key / "checkpoints"
    attempt = subprocess.Popen(
        [str(BIN / "python"), "-m", "pipelines.stage_task", stage],
        cwd=worker,
        env=task_env(key, worker, project, remote, mlflow),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not list(folder.glob(f"{stage}-*.safetensors")):
        assert attempt.poll() is None, "the attempt ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(attempt.pid, signal.SIGKILL)
    attempt.wait()
    (saved,) = folder.glob(f"{stage}-*.safetensors")
    return int(Checkpoint(saved).load()[1]["epoch"])


def repro_single_workspace(root: Path) -> dict[str, str]:
    """``dvc repro pretrain`` in one workspace; the hashes of its outputs."""
    done = subprocess.run(
        [str(BIN / "dvc"), "repro", "pretrain"],
        cwd=root,
        env=workspace_env(root),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out_hashes(yaml.safe_load((root / "dvc.lock").read_text()))


def out_hashes(lock: dict) -> dict[str, str]:
    """path → md5 of every cached output of the stages under test (not the ``cache:
    false`` metrics: they hold timings)."""
    from pipelines.scale_out import uncached_outputs

    found = {}
    for name in DVC_STAGES:
        uncached = set(uncached_outputs(REPO, name))
        for out in lock["stages"][name].get("outs", []):
            if "md5" in out and out["path"] not in uncached:
                found[out["path"]] = out["md5"]
    return found


def test_two_workers_share_only_the_remote_and_unchanged_stages_are_restored(tmp_path, monkeypatch):
    project = make_workspace(tmp_path / "project", OVERRIDES)
    remote, mlflow = tmp_path / "remote", f"sqlite:///{tmp_path / 'mlflow.db'}"
    remote.mkdir()
    # the final task, run here in process as the DAG's dvc_lock task would on a worker
    monkeypatch.setenv("LEPTON_DVC_REMOTE_URL", str(remote))
    monkeypatch.setenv("LEPTON_TASK_DIR", str(tmp_path / "worker-a"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow)

    single = make_workspace(tmp_path / "single", OVERRIDES)
    reference = repro_single_workspace(single)

    from pipelines import scale_out

    logs = {}
    for key in ("scheduled__1", "scheduled__2"):
        for worker, stages in (
            (tmp_path / "worker-a", STAGES_A),
            (tmp_path / "worker-b", STAGES_B),
        ):
            for stage in stages:
                if (key, stage) == ("scheduled__1", "pretrain"):  # first on the other worker
                    killed_at = kill_once_checkpointed(
                        stage, key, tmp_path / "worker-a", project, remote, mlflow
                    )
                logs[key, stage] = run_task(stage, key, worker, project, remote, mlflow)
        # the run's lock from every stage's entry (what the DAG's dvc_lock task does)
        fresh = tmp_path / f"final-{key}"
        subprocess.run(["git", "clone", "-q", str(project), str(fresh)], check=True)
        subprocess.run(
            [str(BIN / "dvc"), "remote", "add", "--local", "-f", "-d", "run", str(remote)],
            cwd=fresh,
            check=True,
        )
        assert scale_out.finalize(str(project), key, STAGES_A + STAGES_B) == 0
        scale_out.write_run_lock(fresh, key)
        lock = yaml.safe_load((fresh / "dvc.lock").read_text())
        assert out_hashes(lock) == reference  # equal to the single workspace, output by output
        pulled = subprocess.run(
            [str(BIN / "dvc"), "pull", *DVC_STAGES], cwd=fresh, capture_output=True, text=True
        )
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        for path in ("data/raw", "data/compressed", "data/partitions", "models/pretrain"):
            assert_same_tree(single / path, fresh / path)
        shutil.rmtree(fresh)

    # the retry on worker B resumed where worker A's attempt was killed, then cleared the copy
    assert 1 <= killed_at < 8
    assert f"resuming after epoch {killed_at} of 8" in logs["scheduled__1", "pretrain"]
    assert not list((remote / "lepton-runs" / "scheduled__1" / "checkpoints").glob("*"))
    for stage in STAGES_A + STAGES_B:
        assert f"scale-out task {stage}: ran" in logs["scheduled__1", stage]
        second = logs["scheduled__2", stage]
        assert f"scale-out task {stage}: restored" in second, second[-2000:]
        assert f"Running stage '{stage}'" not in second and f"stage {stage} done" not in second

    store = scale_out.RunStore(tmp_path / "worker-b" / "scheduled__2" / "pretrain")
    tasks = json.loads(store.read("scheduled__2", "tasks.json"))
    assert set(tasks) == set(STAGES_A + STAGES_B)
    for timing in tasks.values():
        assert timing["pull_seconds"] >= 0 and timing["push_seconds"] > 0
        assert timing["reproduced"] is False


def assert_same_tree(expected: Path, got: Path) -> None:
    names = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
    for name in names:
        assert (expected / name).read_bytes() == (got / name).read_bytes(), name
