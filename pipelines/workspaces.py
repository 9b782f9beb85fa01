"""Run workspaces and the workspace lock: how pipeline runs stay out of each other's way.

DVC is not built for two processes in one workspace (dvc #5795, #10465), and a run that
edits params.yaml while another run is between two stages changes the other run's
params. So there are two ways to run side by side:

- **Queue in the workspace.** Every entry point that starts DVC in a workspace (``lepton
  run``, a DAG task) first takes :func:`workspace_lock`: an exclusive ``flock`` on
  ``.lepton/workspace.lock``. A second one waits, saying who holds it, instead of failing
  on DVC's lock. ``lepton run`` holds it for the whole run and tells its tasks so
  (``LEPTON_WORKSPACE_LOCKED``); a DAG task takes it for its stage. The kernel drops the
  lock when its holder dies, so a kill never leaves the workspace blocked.
- **A workspace of its own** (:func:`create_run_workspace`): a git worktree of the
  workspace's commit at ``.lepton/workspaces/<run key>/`` with the workspace's uncommitted
  changes (params.yaml, dvc.lock, code) copied over and the run's overrides written into
  its own params.yaml. It shares the DVC cache and remote of the main workspace, so
  ``dvc checkout`` restores every output the main dvc.lock records and unchanged stages
  are not computed again, and it logs to the main workspace's MLflow store
  (:func:`run_environment`). ``lepton run --isolated`` and ``runtime.workspace: per_run``
  (every DAG run in its own) use it; the main workspace stays free for people.

Imports nothing heavy: DAG tasks call it once per task.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.errors import LeptonError

LOCK_FILE = Path(".lepton") / "workspace.lock"
LOCKED_ENV = "LEPTON_WORKSPACE_LOCKED"  # set by a holder for the processes it starts
RUNS_DIR = Path(".lepton") / "workspaces"
MARKER = Path(".lepton") / "run-workspace.json"  # written last: the workspace is complete


class WorkspaceError(LeptonError):
    """A run workspace cannot be made (no git repository, git or DVC failed)."""


@contextmanager
def workspace_lock(root: Path, holder: str, wait_message=print) -> Iterator[None]:
    """Hold the workspace's exclusive lock; wait for it (saying who holds it) when taken.

    Nothing happens when this process was started by the holder (``LEPTON_WORKSPACE_LOCKED``
    names this workspace). The lock file says who holds it, for the message of the next
    one waiting.
    """
    root = Path(root).resolve()
    if os.environ.get(LOCKED_ENV) == str(root):
        yield
        return
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            current = handle.read().strip() or "another process"
            wait_message(f"waiting for the workspace {root}: {current} is using it")
            started = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            wait_message(f"workspace free after {time.monotonic() - started:.0f} s")
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{holder} (pid {os.getpid()})\n")
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def locked_environment(root: Path) -> dict[str, str]:
    """Variables that tell the processes a lock holder starts that it holds the lock."""
    return {LOCKED_ENV: str(Path(root).resolve())}


def run_workspace_path(main: Path, key: str) -> Path:
    """Where run ``key``'s own workspace lives under the main workspace."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return Path(main).resolve() / RUNS_DIR / safe


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise WorkspaceError(f"git {' '.join(args)} failed in {root}: {done.stderr.strip()}")
    return done.stdout


def uncommitted_files(main: Path) -> list[str]:
    """Files that differ from HEAD or are untracked and not ignored (what a worktree lacks)."""
    changed = _git(main, "diff", "--name-only", "-z", "HEAD").split("\0")
    untracked = _git(main, "ls-files", "--others", "--exclude-standard", "-z").split("\0")
    return sorted({name for name in changed + untracked if name})


def dvc_config_local(main: Path) -> str:
    """``.dvc/config.local`` of a run workspace: the main workspace's cache, and each of its
    remotes with a relative local URL made absolute (it is relative to the main ``.dvc/``)."""
    from configobj import ConfigObj

    config = ConfigObj(str(main / ".dvc" / "config"))
    local = ConfigObj(str(main / ".dvc" / "config.local"))
    lines = ["[cache]", f"    dir = {(main / '.dvc' / 'cache').resolve()}"]
    cache_dir = local.get("cache", {}).get("dir") or config.get("cache", {}).get("dir")
    if cache_dir:
        lines[1] = f"    dir = {(main / '.dvc' / cache_dir).resolve()}"
    for section in set(config) | set(local):
        if not section.startswith("remote "):
            continue
        url = local.get(section, {}).get("url") or config.get(section, {}).get("url")
        if url and "://" not in url and not Path(url).is_absolute():
            lines += [f"['{section}']", f"    url = {(main / '.dvc' / url).resolve()}"]
    return "\n".join(lines) + "\n"


def link_relative_sources(main: Path, target: Path) -> None:
    """Relative ``ingest.path`` / ``ingest.labels_path`` that live in the main workspace
    (data files people drop there, git-ignored) become links in the run workspace, so
    params stay the same and DVC sees the same inputs."""
    import yaml

    ingest = (yaml.safe_load((target / "params.yaml").read_text()) or {}).get("ingest") or {}
    for key in ("path", "labels_path"):
        value = ingest.get(key)
        if not value or Path(value).is_absolute():
            continue
        source, link = main / value, target / value
        if source.exists() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source.resolve())


def read_whole_yaml(path: Path, seconds: float = 10.0) -> str:
    """The text of a YAML file that another process may be rewriting in place (DVC writes
    dvc.lock that way while a run in the main workspace goes on): read until it parses."""
    import yaml

    deadline = time.monotonic() + seconds
    while True:
        text = path.read_text()
        try:
            yaml.safe_load(text)
            return text
        except yaml.YAMLError:
            if time.monotonic() > deadline:
                raise WorkspaceError(f"{path} does not parse as YAML") from None
            time.sleep(0.1)


def create_run_workspace(main: Path, key: str, overrides: list[str] | tuple = ()) -> Path:
    """Run ``key``'s own workspace (made once; a retry finds it): a git worktree of the main
    workspace's HEAD, its uncommitted files, the run's overrides in params.yaml, the shared
    DVC cache and remotes, and every output of the main dvc.lock checked out from the cache.
    """
    main = Path(main).resolve()
    target = run_workspace_path(main, key)
    if (target / MARKER).is_file():
        return target
    if target.exists():  # a creation that was killed: start again
        subprocess.run(["git", "worktree", "remove", "--force", str(target)], cwd=main)
        shutil.rmtree(target, ignore_errors=True)
    _git(main, "rev-parse", "--verify", "HEAD")
    _git(main, "worktree", "prune")
    _git(main, "worktree", "add", "--detach", "--force", str(target), "HEAD")
    for name in uncommitted_files(main):
        source, copy = main / name, target / name
        if name == "dvc.lock" and source.is_file():
            copy.write_text(read_whole_yaml(source))
        elif source.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy)
        elif copy.is_file() and not source.exists():  # deleted in the main workspace
            copy.unlink()
    (target / ".dvc" / "config.local").write_text(dvc_config_local(main))
    if overrides:
        from pipelines.config import write_overrides

        write_overrides(target / "params.yaml", list(overrides))
    link_relative_sources(main, target)
    dvc = str(Path(sys.executable).parent / "dvc")
    # outputs the main dvc.lock records; one missing from the cache is simply recomputed
    subprocess.run([dvc, "checkout", "--quiet"], cwd=target, capture_output=True, text=True)
    marker = target / MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"main": str(main), "key": key, "overrides": list(overrides)}))
    return target


def list_run_workspaces(main: Path) -> list[tuple[str, str, str, str]]:
    """(run key, overrides, size in MB, path) of each complete run workspace, oldest first."""
    folder = Path(main).resolve() / RUNS_DIR
    rows = []
    paths = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    for path in paths:
        if not (path / MARKER).is_file():
            continue
        info = json.loads((path / MARKER).read_text())
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        overrides = " ".join(info.get("overrides") or []) or "-"
        rows.append((info["key"], overrides, f"{size / 1e6:.1f}", str(path)))
    return rows


def remove_run_workspace(main: Path, key: str) -> Path:
    """Delete run ``key``'s workspace and its git worktree entry; returns its path."""
    main = Path(main).resolve()
    target = run_workspace_path(main, key)
    if not target.exists():
        raise WorkspaceError(f"no run workspace {target}")
    subprocess.run(["git", "worktree", "remove", "--force", str(target)], cwd=main)
    shutil.rmtree(target, ignore_errors=True)
    _git(main, "worktree", "prune")
    return target


def main_workspace_of(root: Path) -> Path:
    """The main workspace a run workspace belongs to (``root`` itself for a main one)."""
    marker = Path(root) / MARKER
    if marker.is_file():
        return Path(json.loads(marker.read_text())["main"])
    return Path(root)


DVC_LOCK_ERRORS = ("Unable to acquire lock", "is busy, it is being blocked by")
# the lines of DVC's lock errors, kept from the user (a plain message says what happens)
DVC_LOCK_LINES = (
    *DVC_LOCK_ERRORS,
    "Most likely another DVC process",
    "(PID ",
    "If there are no processes with such PIDs",
    "Having any troubles?",
)
DVC_LOCK_RETRY_SECONDS = 5.0


def dvc_lock_holders(root: Path) -> list[int]:
    """PIDs of live processes that hold DVC stage locks (``.dvc/tmp/rwlock``) in ``root``:
    a ``dvc repro`` that is running a stage there."""
    try:
        lock = json.loads((Path(root) / ".dvc" / "tmp" / "rwlock").read_text())
    except (OSError, ValueError):
        return []
    infos = list(lock.get("write", {}).values())
    infos += [i for entries in lock.get("read", {}).values() for i in entries]
    pids = {int(info["pid"]) for info in infos if process_alive(int(info["pid"]))}
    return sorted(pids - {os.getpid()})


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not reaped, holds nothing)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_dvc(
    argv: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    echo=print,
    patience_seconds: float = 3600.0,
) -> int:
    """Run a DVC command, its output passed through, around a ``dvc`` started by hand that
    :func:`workspace_lock` does not see: first wait while one is running a stage in ``cwd``;
    then, while the command fails on DVC's own lock (that process between two stages), say
    so and try again every few seconds, for up to ``patience_seconds`` in all. DVC's lock
    error lines and the lines a retry repeats are not passed on. Returns the exit code."""
    started = time.monotonic()
    shown: set[str] = set()  # lines earlier attempts passed on
    while True:
        if holders := dvc_lock_holders(cwd):
            echo(f"waiting: DVC (pid {', '.join(map(str, holders))}) is running a stage in {cwd}")
            while dvc_lock_holders(cwd) and time.monotonic() - started < patience_seconds:
                time.sleep(1.0)
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        blocked, attempt = False, set()
        for raw in process.stdout:
            line = raw.rstrip("\n")
            if any(marker in line for marker in DVC_LOCK_LINES):
                blocked = blocked or any(e in line for e in DVC_LOCK_ERRORS)
                continue
            if line not in shown or not line.strip():
                echo(line)
            attempt.add(line)
        shown |= attempt
        code = process.wait()
        if code == 0 or not blocked or time.monotonic() - started > patience_seconds:
            return code
        echo(
            f"another DVC process holds a lock in {cwd}; trying again in "
            f"{DVC_LOCK_RETRY_SECONDS:g} s"
        )
        time.sleep(DVC_LOCK_RETRY_SECONDS)


def run_environment(main: Path) -> dict[str, str]:
    """Variables for processes in a run workspace: MLflow stays the main workspace's."""
    from pipelines.tracking import tracking_uri

    return {"MLFLOW_TRACKING_URI": tracking_uri(Path(main))}
