"""The warm stage runner (``pipelines.stage_runner``): ``lepton stage run`` forked from it
with the client's streams, directory, environment and exit status; kills reach the stage;
no runner (or another installation's) means the stage runs in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from pipelines import stage_runner
from tests.conftest import BIN, workspace_env

pytestmark = pytest.mark.slow

FORKED = "forked by the stage runner"


@pytest.fixture
def runner(tiny_workspace: Path, tmp_path: Path):
    """A runner for ``tiny_workspace`` (as ``lepton run`` starts one): yields the env of
    commands that use it."""
    env = workspace_env(tiny_workspace)
    with stage_runner.running(tiny_workspace, env, tmp_path / "runner.log") as runner_env:
        assert runner_env, (tmp_path / "runner.log").read_text()
        yield {**env, **runner_env}


def stage(root: Path, env: dict[str, str], *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "lepton"), "stage", "run", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def forked_stages(socket_path: str) -> list[psutil.Process]:
    """The stages the runner listening on ``socket_path`` has forked and that still run."""
    for process in psutil.process_iter(["cmdline"]):
        if socket_path in (process.info["cmdline"] or []):
            running = []
            for child in process.children():
                try:
                    if child.status() != psutil.STATUS_ZOMBIE:
                        running.append(child)
                except psutil.NoSuchProcess:
                    pass
            return running
    raise AssertionError(f"no runner on {socket_path}")


def test_stages_run_forked_with_their_clients_output_directory_env_and_exit_code(
    tiny_workspace: Path, runner: dict[str, str]
):
    root = tiny_workspace
    ingest = stage(root, runner, "ingest")
    output = ingest.communicate(timeout=300)[0]
    assert ingest.returncode == 0, output
    assert "stage ingest started (pipeline run" in output and FORKED in output, output
    assert "stage ingest done" in output  # through the client's own stdout pipe
    assert (root / "data" / "raw" / "manifest.json").exists()  # in the client's directory
    # a stage's error: its message and exit code, as from a process of its own
    bad = stage(root, runner, "compress", "--set", "compress.nonsense=1")
    output = bad.communicate(timeout=300)[0]
    assert bad.returncode == 1, output
    assert "compress.nonsense" in output and FORKED in output, output
    # the environment is the client's: another workspace's stage fails on its own params
    elsewhere = {**runner, "LEPTON_WORKSPACE": str(root / "missing")}
    lost = stage(root, elsewhere, "ingest")
    output = lost.communicate(timeout=300)[0]
    assert lost.returncode != 0 and str(root / "missing") in output, output


def test_a_killed_client_takes_its_forked_stage_with_it(tiny_workspace: Path, runner):
    root = tiny_workspace
    for name in ("ingest", "compress", "partition"):
        done = stage(root, runner, name)
        assert done.wait(timeout=300) == 0, done.stdout.read()
    socket_path = runner[stage_runner.RUNNER_ENV]
    checkpoints = root / ".lepton" / "checkpoints"
    for number in (signal.SIGKILL, signal.SIGTERM):
        started = time.time()
        client = stage(root, runner, "pretrain", "--set", "pretrain.epochs=200")
        deadline = time.monotonic() + 120
        while not [c for c in checkpoints.glob("pretrain-*") if c.stat().st_mtime > started]:
            assert client.poll() is None, client.stdout.read()
            assert time.monotonic() < deadline, "no epoch saved in 120 s"
            time.sleep(0.05)
        (child,) = forked_stages(socket_path)
        assert child.name() == "lepton-pretrain"
        os.kill(client.pid, number)
        assert client.wait(timeout=30) == -number  # as a stage process of its own would end
        child.wait(timeout=10)  # SIGKILL: the runner saw the client go; SIGTERM: passed on
        assert forked_stages(socket_path) == []


def test_without_a_runner_the_stage_runs_in_its_own_process(tiny_workspace: Path):
    env = {**workspace_env(tiny_workspace), stage_runner.RUNNER_ENV: "/nonexistent/socket"}
    ingest = stage(tiny_workspace, env, "ingest")
    output = ingest.communicate(timeout=300)[0]
    assert ingest.returncode == 0, output
    assert "stage ingest done" in output and FORKED not in output, output


def test_the_code_stamp_changes_with_any_python_file(tmp_path: Path):
    (tmp_path / "pkg").mkdir()
    module = tmp_path / "pkg" / "stage.py"
    module.write_text("x = 1\n")
    before = stage_runner.code_stamp(tmp_path)
    assert stage_runner.code_stamp(tmp_path) == before
    module.write_text("x = 2\n")
    os.utime(module, ns=(0, 10**9))  # same size; another time
    assert stage_runner.code_stamp(tmp_path) != before
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    after = stage_runner.code_stamp(tmp_path)
    (tmp_path / "pkg" / "new.py").write_text("")
    assert stage_runner.code_stamp(tmp_path) != after


def test_a_runner_refuses_another_installation(runner, monkeypatch):
    monkeypatch.setattr(
        stage_runner, "_installation", lambda: {"python": "/elsewhere/python", "code": "/x"}
    )
    argv = ["lepton", "stage", "list"]
    assert stage_runner.run_in_runner(runner[stage_runner.RUNNER_ENV], argv) is None


def test_airflow_standalone_runs_its_tasks_with_a_stage_runner(tiny_workspace: Path, monkeypatch):
    """`lepton airflow standalone` (and `scheduler`) hand their DAG runs' tasks a warm stage
    runner for their lifetime, as `lepton run` does; other airflow commands get none; a
    runner that already answers on ``LEPTON_STAGE_RUNNER`` is used instead of a new one."""
    from typer.testing import CliRunner

    from pipelines import cli

    seen = []

    def call(argv, env, cwd):
        socket_path = env.get(stage_runner.RUNNER_ENV)
        seen.append(
            (argv[1:], socket_path, bool(socket_path) and stage_runner.answers(socket_path))
        )
        return 0

    monkeypatch.setattr(cli.subprocess, "call", call)
    monkeypatch.delenv(stage_runner.RUNNER_ENV, raising=False)
    workspace = {"LEPTON_WORKSPACE": str(tiny_workspace)}
    for args in (["standalone"], ["dags", "list"]):
        result = CliRunner().invoke(cli.app, ["airflow", *args], env=workspace)
        assert result.exit_code == 0, result.output
    (standalone, its_socket, answered), listed = seen
    assert standalone == ["standalone"] and answered, seen
    assert listed == (["dags", "list"], None, False)
    assert not stage_runner.answers(its_socket)  # stopped with the command
    assert (tiny_workspace / ".lepton/logs/airflow.stage-runner.log").exists()

    seen.clear()
    with stage_runner.running(
        tiny_workspace, workspace_env(tiny_workspace), tiny_workspace / "r.log"
    ) as ours:
        result = CliRunner().invoke(cli.app, ["airflow", "scheduler"], env={**workspace, **ours})
        assert result.exit_code == 0, result.output
    assert seen == [(["scheduler"], ours[stage_runner.RUNNER_ENV], True)]

    seen.clear()  # a broken params.yaml: Airflow still starts (its tasks report the error)
    (tiny_workspace / "params.yaml").write_text("federate: {rounds: -1}\n")
    result = CliRunner().invoke(cli.app, ["airflow", "standalone"], env=workspace)
    assert result.exit_code == 0, result.output
    assert seen == [(["standalone"], None, False)] and "no stage runner" in result.output
