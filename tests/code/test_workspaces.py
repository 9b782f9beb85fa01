"""Run workspaces and the workspace lock (pipelines/workspaces.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import yaml

from pipelines import workspaces
from tests.conftest import BIN, workspace_env


def test_run_workspace_has_the_uncommitted_state_and_the_overrides(workspace):
    (workspace / "params.yaml").write_text(
        (workspace / "params.yaml").read_text().replace("seed: 42", "seed: 5")
    )
    (workspace / "notes.txt").write_text("untracked, not ignored\n")
    with (workspace / ".gitignore").open("a") as ignore:
        ignore.write("data/incoming/\n")
    (workspace / "data" / "incoming").mkdir(parents=True)
    (workspace / "data" / "incoming" / "rows.csv").write_text("label,x\n")
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["ingest"].update(source="csv", path="data/incoming/rows.csv", image_shape=[1, 1])
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    work = workspaces.create_run_workspace(workspace, "run-1", ["federate.rounds=3"])

    assert work == workspace / ".lepton" / "workspaces" / "run-1"
    got = yaml.safe_load((work / "params.yaml").read_text())
    assert got["common"]["seed"] == 5 and got["federate"]["rounds"] == 3
    assert yaml.safe_load((workspace / "params.yaml").read_text())["federate"]["rounds"] != 3
    assert (work / "notes.txt").read_text() == "untracked, not ignored\n"
    # the git-ignored source file is linked, so params (and DVC's view) stay the same
    assert (work / "data/incoming/rows.csv").resolve() == (
        workspace / "data/incoming/rows.csv"
    ).resolve()
    config = (work / ".dvc" / "config.local").read_text()
    assert f"dir = {workspace / '.dvc' / 'cache'}" in config
    assert f"url = {workspace / '.dvc-remote'}" in config
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True)
    main_head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True
    )
    assert head.stdout == main_head.stdout
    # a retry finds it; a creation killed half-way (no marker) is made again
    assert workspaces.create_run_workspace(workspace, "run-1") == work
    (work / workspaces.MARKER).unlink()
    (work / "params.yaml").write_text("half written")
    again = workspaces.create_run_workspace(workspace, "run-1", ["federate.rounds=3"])
    assert yaml.safe_load((again / "params.yaml").read_text())["federate"]["rounds"] == 3
    assert workspaces.main_workspace_of(again) == workspace.resolve()


def test_a_bad_override_makes_no_workspace(workspace):
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match="federate.rounds"):
        workspaces.create_run_workspace(workspace, "run-bad", ["federate.rounds=-1"])
    assert not (workspace / ".lepton" / "workspaces" / "run-bad" / workspaces.MARKER).exists()


def test_the_second_holder_waits_and_says_who_holds_the_lock(tmp_path):
    said: list[str] = []
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with workspaces.workspace_lock(tmp_path, "first run"):
            first_in.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    # flock locks belong to open files, so a second open in this process waits as another
    # process would
    with workspaces.workspace_lock(tmp_path, "second run", said.append):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
    assert said[0].startswith(f"waiting for the workspace {tmp_path.resolve()}: first run (pid")
    assert said[1].startswith("workspace free after")


def test_a_process_started_by_the_holder_does_not_wait(tmp_path, monkeypatch):
    with workspaces.workspace_lock(tmp_path, "lepton run"):
        monkeypatch.setenv(workspaces.LOCKED_ENV, str(tmp_path.resolve()))
        with workspaces.workspace_lock(tmp_path, "its task", lambda m: pytest.fail(m)):
            pass


HOLD_DVC_LOCK = """
import sys, time
from dvc.repo import Repo
repo = Repo(sys.argv[1])
with repo.lock:
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.slow
def test_dvc_started_by_hand_makes_the_task_wait_not_fail(workspace, monkeypatch):
    """A real DVC lock held by another process: the command waits, says why, then runs."""
    monkeypatch.setattr(workspaces, "DVC_LOCK_RETRY_SECONDS", 1.0)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DVC_LOCK, str(workspace), "6"],
        stdout=subprocess.PIPE,
        text=True,
        env=workspace_env(workspace),
    )
    assert holder.stdout.readline().strip() == "holding"
    lines: list[str] = []
    code = workspaces.run_dvc(
        [str(BIN / "dvc"), "repro", "--single-item", "ingest_source"],
        workspace,
        {**workspace_env(workspace), "LEPTON_WORKSPACE": str(workspace)},
        lines.append,
    )
    holder.wait()
    assert code == 0, "\n".join(lines)
    text = "\n".join(lines)
    assert "another DVC process holds a lock" in text
    assert not any(error in text for error in workspaces.DVC_LOCK_ERRORS)  # DVC's own words
    assert (workspace / "data" / "source.json").is_file()


def test_list_and_remove_run_workspaces(workspace):
    work = workspaces.create_run_workspace(workspace, "run-2", ["federate.rounds=4"])
    [(key, overrides, _size, path)] = workspaces.list_run_workspaces(workspace)
    assert (key, overrides, path) == ("run-2", "federate.rounds=4", str(work))
    assert workspaces.remove_run_workspace(workspace, "run-2") == work
    assert not work.exists() and workspaces.list_run_workspaces(workspace) == []
    listed = subprocess.run(["git", "worktree", "list"], cwd=workspace, capture_output=True)
    assert str(work).encode() not in listed.stdout
    with pytest.raises(workspaces.WorkspaceError, match="no run workspace"):
        workspaces.remove_run_workspace(workspace, "run-2")
