"""What one DAG task runs: its stage's ``dvc repro --single-item``, unless DVC said it is fresh.

A no-op ``dvc repro`` costs a DVC start-up (1 to 1.6 s here), nine times per DAG run. So the
first task (ingest) reproduces its stages, then asks ``dvc status`` once for the whole
pipeline and writes the stages it found up to date next to the run's records (the *fresh
snapshot*). A later task whose stage is in the snapshot exits without starting DVC.

The snapshot is only as good as the workspace it describes, so it is thrown away as soon as
anything may have changed: a task that starts ``dvc repro`` deletes it first (every later
task then asks DVC itself); a retried or cleared task (try 2 or more) does not trust it; the
last task deletes it. A DAG run with nothing new therefore starts DVC twice, and one with
changes behaves exactly as plain ``dvc repro --single-item`` per task from the first changed
stage on.

    python -m pipelines.stage_task <stage>

Where it runs (:mod:`pipelines.workspaces`): with ``runtime.workspace: shared`` in the
workspace, holding its lock for the task, so a ``lepton run`` or another DAG run there waits
its turn instead of failing on DVC's lock; with ``per_run``, in the DAG run's own workspace
(``.lepton/workspaces/<run key>``, made by the first task that needs it). Either way a
``dvc`` started by hand that holds DVC's lock makes it wait and try again.

Environment: ``LEPTON_PIPELINE_RUN`` (the run key; without it there is no snapshot),
``LEPTON_TASK_TRY`` (Airflow's try number), ``LEPTON_DVC`` (the dvc executable),
``LEPTON_WORKSPACE_MODE`` (``shared``, ``per_run`` or ``per_task``: the scale-out mode,
:func:`run_scale_out_task`).

Imports nothing heavy: it runs once per task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipelines.registry import STAGES, Stage, get_stage
from pipelines.runlog import records_path

SKIP_MESSAGE = "Stage '{name}' is up to date (dvc status at the start of this run), skipping"


def snapshot_path(root: Path, key: str) -> Path:
    """Where pipeline run ``key`` keeps its fresh snapshot (beside its stage records)."""
    return records_path(root, key).with_suffix(".fresh.json")


def fresh_stages(status: dict) -> list[str]:
    """Registry stages that ``dvc status --json`` does not list (so are up to date)."""
    listed = {name.rsplit(":", 1)[-1] for name in status}
    return [stage.name for stage in STAGES if stage.name not in listed]


def write_snapshot(root: Path, key: str, dvc: str) -> None:
    """Ask ``dvc status`` once and write the fresh stages; no file when it fails."""
    from pipelines.io import write_text_atomic  # numpy: only the first task writes

    done = subprocess.run([dvc, "status", "--json"], cwd=root, capture_output=True, text=True)
    try:
        status = json.loads(done.stdout) if done.returncode == 0 else None
    except json.JSONDecodeError:
        status = None
    if not isinstance(status, dict):
        print(f"dvc status failed; every task runs dvc repro itself:\n{done.stderr[-2000:]}")
        return
    path = snapshot_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"fresh": fresh_stages(status)}))


def read_snapshot(root: Path, key: str) -> set[str]:
    """The fresh stages of run ``key``; empty when there is no readable snapshot."""
    try:
        return set(json.loads(snapshot_path(root, key).read_text())["fresh"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def drop_snapshot(root: Path, key: str) -> None:
    """Delete run ``key``'s snapshot (nothing to do when there is none)."""
    snapshot_path(root, key).unlink(missing_ok=True)


def repro_argv(stage: Stage, dvc: str) -> list[str]:
    """The stage's own command: ``dvc repro --single-item`` of its DVC targets."""
    return [dvc, "repro", "--single-item", *stage.dvc_targets]


def release_dead_dvc_locks(root: Path) -> list[int]:
    """Remove DVC's stage locks (``.dvc/tmp/rwlock``) held by processes that no longer run.

    A killed task's ``dvc repro`` leaves its entries behind, and where nothing reaps the
    killed process (a container without an init) its PID still looks alive, so DVC refuses
    the retry ("... is busy, it is being blocked by ..."). A zombie holds nothing. Edits
    go through DVC's own rwlock guard. Returns the PIDs whose locks were released."""
    from pipelines.workspaces import process_alive as alive

    lock_dir = root / ".dvc" / "tmp"
    if not (lock_dir / "rwlock").is_file():
        return []
    from dvc.fs import LocalFileSystem
    from dvc.rwlock import _edit_rwlock

    released: set[int] = set()
    with _edit_rwlock(str(lock_dir), LocalFileSystem(), False) as lock:
        for path, info in list(lock["write"].items()):
            if not alive(int(info["pid"])):
                released.add(int(info["pid"]))
                del lock["write"][path]
        for path, infos in list(lock["read"].items()):
            keep = [i for i in infos if alive(int(i["pid"]))]
            released |= {int(i["pid"]) for i in infos if i not in keep}
            if keep:
                lock["read"][path] = keep
            else:
                del lock["read"][path]
    return sorted(released)


def run_task(
    name: str, root: Path, key: str, try_number: int, dvc: str, mode: str = "shared"
) -> int:
    """Run the DAG task of stage ``name`` in the workspace ``mode`` says; returns the exit
    code."""
    from pipelines import workspaces

    if mode == "per_task":
        return run_scale_out_task(name, root, key)
    if mode == "per_run" and key:
        work = workspaces.create_run_workspace(root, key)
        print(f"run workspace of {key}: {work}", flush=True)
        env = {**os.environ, **workspaces.run_environment(root), "LEPTON_WORKSPACE": str(work)}
        return run_stage_in(name, work, key, try_number, dvc, env)
    with workspaces.workspace_lock(root, f"DAG task {name} of {key or 'a run'}"):
        return run_stage_in(name, root, key, try_number, dvc, dict(os.environ))


def run_scale_out_task(name: str, root: Path, key: str) -> int:
    """A task of the scale-out mode (:mod:`pipelines.scale_out`): its own checkout of
    ``LEPTON_GIT_URL`` (default: the workspace) at ``LEPTON_COMMIT`` (default: the run's),
    with ``LEPTON_OVERRIDES`` (a JSON list); ``dvc_lock`` is the run's final task."""
    from pipelines import scale_out
    from pipelines.tracking import tracking_uri

    if not key:
        print("error: a scale-out task needs its DAG run (LEPTON_PIPELINE_RUN)", file=sys.stderr)
        return 2
    # without a tracking server, the workspace's own store (one machine)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(root))
    source = os.environ.get("LEPTON_GIT_URL") or str(root)
    try:
        if name == scale_out.FINAL_TASK:
            return scale_out.finalize(source, key)
        overrides = json.loads(os.environ.get("LEPTON_OVERRIDES") or "[]")
        return scale_out.run_task(name, source, key, overrides, os.environ.get("LEPTON_COMMIT", ""))
    except scale_out.ScaleOutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_stage_in(
    name: str, root: Path, key: str, try_number: int, dvc: str, env: dict[str, str]
) -> int:
    """The task's work in workspace ``root``: skip on the fresh snapshot, else
    ``dvc repro --single-item`` (waiting out DVC locks of hand-started ``dvc``)."""
    from pipelines.workspaces import run_dvc

    stage = get_stage(name)
    first, last = STAGES[0], STAGES[-1]
    trusted = key and try_number <= 1 and stage is not first
    if trusted and stage.name in read_snapshot(root, key):
        print(SKIP_MESSAGE.format(name=stage.name), flush=True)
        if stage is last:
            drop_snapshot(root, key)
        return 0
    if key:
        drop_snapshot(root, key)
    released = release_dead_dvc_locks(root)
    if released:
        print(f"released DVC locks of killed processes {released}", flush=True)
    code = run_dvc(repro_argv(stage, dvc), root, env, lambda line: print(line, flush=True))
    if code == 0 and key and stage is first:
        write_snapshot(root, key, dvc)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.stage_task <stage>``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.stage_task <stage>", file=sys.stderr)
        return 2
    try:
        try_number = int(os.environ.get("LEPTON_TASK_TRY") or 1)
    except ValueError:
        try_number = 1
    root = Path(os.environ.get("LEPTON_WORKSPACE") or Path.cwd()).resolve()
    mode = os.environ.get("LEPTON_WORKSPACE_MODE") or "shared"
    try:
        if not (mode == "per_task" and args[0] == "dvc_lock"):
            get_stage(args[0])
    except KeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_task(
        args[0],
        root,
        os.environ.get("LEPTON_PIPELINE_RUN", ""),
        try_number,
        os.environ.get("LEPTON_DVC") or "dvc",
        mode,
    )


if __name__ == "__main__":
    sys.exit(main())
