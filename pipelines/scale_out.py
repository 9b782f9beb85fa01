"""Scale-out mode (``runtime.workspace: per_task``): each DAG task in a clean checkout.

When a team outgrows one machine, stage tasks run on Celery or Kubernetes workers that
share no workspace. The DVC remote is the one thing they share (and the MLflow server). A
task of stage S in DAG run K:

1. **checkout**: ``git clone`` of the project (``LEPTON_GIT_URL``; by default the workspace
   the DAG was parsed from) into its task folder (``$LEPTON_TASK_DIR/<K>/<S>``, kept for a
   retry on the same worker), at the run's commit:
   the DAG run's ``commit`` conf, else the one the run's first task recorded, else HEAD.
   The run's ``overrides`` conf goes into its params.yaml; ``LEPTON_DVC_REMOTE_URL``, when
   set, replaces the default remote's URL (``.dvc/config.local``).
2. **lock entries**: the run manifest in the remote (``lepton-runs/`` beside DVC's
   ``files/``) holds the last finished run's dvc.lock and each finished task's stage
   entries for this run, with the stage's ``cache: false`` files (its metrics). They are
   merged into the checkout's dvc.lock, so DVC sees upstream outputs as this run made them
   and the stage itself as it was last made.
3. **pull**: ``dvc pull`` of the upstream stages' outputs (timed).
4. **repro**: ``dvc repro --single-item <S> --pull``: an unchanged stage has its outputs
   pulled, not recomputed; a changed one runs. Its checkpoints are also saved in the remote
   (``lepton-runs/<K>/checkpoints/``, :class:`RemoteCheckpoints`), so a retry of a killed
   task resumes from its last epoch or round on any worker.
5. **push**: ``dvc push`` of the stage's outputs and ``dvc push --run-cache`` (timed; DVC's
   run-cache skips the persisted stages of this project, so it mostly holds nothing).
6. **publish**: ``lepton-runs/<K>/stages/<S>.json``: the stage's lock entries, its
   ``cache: false`` files, whether it ran, and the seconds each step took.

The final task (``dvc_lock``) merges the run's entries into one dvc.lock and writes it to
``lepton-runs/<K>/dvc.lock`` and ``lepton-runs/latest/dvc.lock`` (the next run starts from
it), and logs it to the run's MLflow parent run. ``lepton scale-out lock <K>`` writes it
into a workspace, where ``dvc pull`` then brings every output.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipelines.checkpoints import CHECKPOINT_STORE_ENV
from pipelines.errors import LeptonError
from pipelines.registry import STAGES, get_stage, upstream_of

MANIFEST = "lepton-runs"
LATEST = "latest"
FINAL_TASK = "dvc_lock"


class ScaleOutError(LeptonError):
    """A scale-out task cannot check out, read or write the run manifest."""


def task_folder(key: str, stage: str) -> Path:
    """Where the task of ``stage`` in run ``key`` checks out (kept for its retries)."""
    base = Path(os.environ.get("LEPTON_TASK_DIR") or Path(tempfile.gettempdir()) / "lepton-tasks")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return base / safe / stage


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ScaleOutError(
            f"{' '.join(argv)} failed in {cwd}: {(done.stderr or done.stdout)[-2000:]}"
        )
    return done.stdout


class RunStore:
    """The run manifest in the checkout's default DVC remote (``<remote>/lepton-runs``)."""

    def __init__(self, checkout: Path) -> None:
        from dvc.repo import Repo

        remote = Repo(str(checkout)).cloud.get_remote()
        self.fs = remote.fs
        self.base = self.fs.join(remote.path, MANIFEST)

    def path(self, *parts: str) -> str:
        return self.fs.join(self.base, *parts)

    def read(self, *parts: str) -> bytes | None:
        """The file at ``parts``, or ``None``."""
        path = self.path(*parts)
        return self.fs.cat_file(path) if self.fs.exists(path) else None

    def write(self, data: bytes, *parts: str) -> None:
        """Write the file at ``parts`` whole (a temp file, then a move)."""
        path = self.path(*parts)
        self.fs.makedirs(self.fs.parent(path), exist_ok=True)
        temp = f"{path}.tmp-{os.getpid()}"
        self.fs.pipe_file(temp, data)
        self.fs.mv(temp, path)

    def stage_entries(self, key: str) -> dict[str, dict[str, Any]]:
        """Stage name → published entry of every finished task of run ``key``."""
        folder = self.path(key, "stages")
        if not self.fs.exists(folder):
            return {}
        entries = {}
        for path in self.fs.ls(folder):
            name = Path(str(path)).name
            if name.endswith(".json"):
                entries[name.removesuffix(".json")] = json.loads(self.fs.cat_file(path))
        return entries


class RemoteCheckpoints:
    """The checkpoints of one DAG run in the DVC remote (``lepton-runs/<run>/checkpoints/``):
    a :class:`~pipelines.checkpoints.CheckpointMirror`, so that a task retried on another
    worker resumes where the killed attempt saved."""

    def __init__(self, store: RunStore, key: str) -> None:
        self.store, self.key = store, key

    def read(self, name: str) -> bytes | None:
        """The checkpoint file ``name``, or None."""
        return self.store.read(self.key, "checkpoints", name)

    def write(self, data: bytes, name: str) -> None:
        """Replace the checkpoint file ``name``, whole."""
        self.store.write(data, self.key, "checkpoints", name)

    def delete(self, name: str) -> None:
        """Delete the checkpoint file ``name``, if there is one."""
        path = self.store.path(self.key, "checkpoints", name)
        if self.store.fs.exists(path):
            self.store.fs.rm(path)


def remote_checkpoints(checkout: Path, key: str) -> RemoteCheckpoints:
    """The checkpoints of DAG run ``key`` in the default DVC remote of ``checkout``."""
    return RemoteCheckpoints(RunStore(checkout), key)


def uncached_outputs(checkout: Path, dvc_stage: str) -> list[str]:
    """Paths of ``dvc_stage``'s outputs, metrics and plots with ``cache: false``."""
    stages = yaml.safe_load((checkout / "dvc.yaml").read_text())["stages"]
    found = []
    for kind in ("outs", "metrics", "plots"):
        for item in stages.get(dvc_stage, {}).get(kind, []) or []:
            if isinstance(item, dict):
                [(path, options)] = item.items()
                if (options or {}).get("cache") is False:
                    found.append(path)
    return found


def read_lock(path: Path) -> dict[str, Any]:
    if path.is_file():
        return yaml.safe_load(path.read_text()) or {}
    return {}


def merge_entries(checkout: Path, lock_texts: list[bytes], entries: list[dict]) -> None:
    """Merge whole dvc.lock texts, then published stage entries (later wins), into the
    checkout's dvc.lock, and write every ``cache: false`` file the entries carry."""
    lock = read_lock(checkout / "dvc.lock")
    lock.setdefault("schema", "2.0")
    stages = lock.setdefault("stages", {})
    for text in lock_texts:
        stages.update((yaml.safe_load(text) or {}).get("stages", {}))
    for entry in entries:
        stages.update(entry["lock"])
        for path, data in entry.get("files", {}).items():
            target = checkout / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(data))
    (checkout / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def prepare_checkout(
    source: str, key: str, stage: str, overrides: list[str], commit: str = ""
) -> tuple[Path, str]:
    """The task's checkout of ``source`` at the run's commit (see the module doc);
    returns it and the commit."""
    folder = task_folder(key, stage)
    if not (folder / ".git").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = folder.with_name(f".{stage}.clone-{os.getpid()}")
        _run(["git", "clone", "--quiet", source, str(partial)], folder.parent)
        partial.rename(folder)
    if remote_url := os.environ.get("LEPTON_DVC_REMOTE_URL"):
        _run(
            [_dvc(), "remote", "add", "--local", "--force", "--default", "run", remote_url], folder
        )
    store = RunStore(folder)
    commit = commit or (store.read(key, "commit") or b"").decode().strip()
    if not commit:
        commit = _run(["git", "rev-parse", "HEAD"], folder).strip()
    if not _has(folder, commit):  # a commit made after the clone
        _run(["git", "fetch", "--quiet", "origin", commit], folder)
    _run(["git", "checkout", "--quiet", "--force", "--detach", commit], folder)
    if store.read(key, "commit") is None:
        store.write(commit.encode(), key, "commit")
    if overrides:
        from pipelines.config import write_overrides

        write_overrides(folder / "params.yaml", overrides)
    return folder, commit


def _has(folder: Path, commit: str) -> bool:
    return (
        subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=folder).returncode
        == 0
    )


def _dvc() -> str:
    return os.environ.get("LEPTON_DVC") or str(Path(sys.executable).parent / "dvc")


def run_task(name: str, source: str, key: str, overrides: list[str], commit: str = "") -> int:
    """Run stage ``name``'s task of run ``key`` in its own checkout; returns the exit code."""
    from pipelines.workspaces import run_dvc

    stage = get_stage(name)
    dvc = _dvc()
    times: dict[str, float] = {}
    started = time.perf_counter()
    checkout, commit = prepare_checkout(source, key, name, overrides, commit)
    store = RunStore(checkout)
    done = store.stage_entries(key)
    latest = store.read(LATEST, "dvc.lock")
    mine = [done[n] for n in done if n != name]
    merge_entries(checkout, [latest] if latest else [], mine)
    if latest and (own := _own_files(latest, checkout, stage.dvc_targets, store)):
        merge_entries(checkout, [], [own])
    times["checkout_seconds"] = time.perf_counter() - started
    print(f"scale-out task {name} of {key}: checkout of {commit[:12]} in {checkout}", flush=True)

    env = {
        **os.environ,
        "LEPTON_WORKSPACE": str(checkout),
        "LEPTON_PIPELINE_RUN": key,
        CHECKPOINT_STORE_ENV: key,  # a retry on another worker resumes from the remote
    }
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    upstream = [t for u in upstream_of(name) for t in get_stage(u).dvc_targets]
    mark = time.perf_counter()
    if upstream and run_dvc([dvc, "pull", "--quiet", *upstream], checkout, env, echo) != 0:
        return 1
    times["pull_seconds"] = time.perf_counter() - mark
    mark = time.perf_counter()
    code = run_dvc(
        [dvc, "repro", "--single-item", "--pull", *stage.dvc_targets], checkout, env, echo
    )
    times["repro_seconds"] = time.perf_counter() - mark
    if code != 0:
        return code
    mark = time.perf_counter()
    for argv in (
        [dvc, "push", "--quiet", *stage.dvc_targets],
        [dvc, "push", "--quiet", "--run-cache"],
    ):
        if run_dvc(argv, checkout, env, echo) != 0:
            return 1
    times["push_seconds"] = time.perf_counter() - mark
    # ingest's source probe runs every time; whether the stage itself ran is what counts
    ran = any(f"Running stage '{name}'" in line for line in lines)
    lock = read_lock(checkout / "dvc.lock").get("stages", {})
    entry = {
        "stage": name,
        "commit": commit,
        "reproduced": ran,
        "lock": {t: lock[t] for t in stage.dvc_targets if t in lock},
        "files": _files(checkout, stage.dvc_targets),
        **{k: round(v, 3) for k, v in times.items()},
    }
    store.write(json.dumps(entry).encode(), key, "stages", f"{name}.json")
    summary = ", ".join(f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in times.items())
    print(f"scale-out task {name}: {'ran' if ran else 'restored'}; {summary}", flush=True)
    return 0


def _files(checkout: Path, dvc_stages: tuple[str, ...]) -> dict[str, str]:
    files = {}
    for dvc_stage in dvc_stages:
        for path in uncached_outputs(checkout, dvc_stage):
            if (checkout / path).is_file():
                files[path] = base64.b64encode((checkout / path).read_bytes()).decode()
    return files


def _own_files(latest: bytes, checkout: Path, dvc_stages, store: RunStore) -> dict | None:
    """The last finished run's ``cache: false`` files of this stage (kept in the final
    manifest), so an unchanged stage is restored whole."""
    files = store.read(LATEST, "files.json")
    if not files:
        return None
    wanted = {p for s in dvc_stages for p in uncached_outputs(checkout, s)}
    kept = {p: d for p, d in json.loads(files).items() if p in wanted}
    return {"lock": {}, "files": kept} if kept else None


def finalize(source: str, key: str, stages: tuple[str, ...] | None = None) -> int:
    """The DAG run's last task: one dvc.lock from the entry of every stage (or of
    ``stages``), into the manifest (the run's and ``latest``) and the run's MLflow parent
    run. Fails when one has no entry."""
    names = list(stages or (s.name for s in STAGES))
    checkout, _ = prepare_checkout(source, key, FINAL_TASK, [])
    store = RunStore(checkout)
    entries = store.stage_entries(key)
    missing = [name for name in names if name not in entries]
    if missing:
        print(f"error: run {key} has no finished task for: {', '.join(missing)}", file=sys.stderr)
        return 1
    lock = {"schema": "2.0", "stages": {}}
    files: dict[str, str] = {}
    for name in names:
        lock["stages"].update(entries[name]["lock"])
        files.update(entries[name]["files"])
    text = yaml.safe_dump(lock, sort_keys=False).encode()
    store.write(text, key, "dvc.lock")
    store.write(text, LATEST, "dvc.lock")
    store.write(json.dumps(files).encode(), key, "files.json")
    store.write(json.dumps(files).encode(), LATEST, "files.json")
    timing = {
        name: {k: v for k, v in entries[name].items() if k.endswith("_seconds")}
        | {"reproduced": entries[name]["reproduced"]}
        for name in names
    }
    store.write(json.dumps(timing, indent=2).encode(), key, "tasks.json")
    (checkout / "dvc.lock").write_bytes(text)
    _log_lock(checkout, key, timing)
    print(f"dvc.lock of run {key}: {store.path(key, 'dvc.lock')}", flush=True)
    return 0


def _log_lock(checkout: Path, key: str, timing: dict) -> None:
    """Attach the run's dvc.lock and task timings to its MLflow parent run (when it has
    one: a run whose every stage was restored logged none)."""
    from pipelines import tracking

    client = tracking.client(checkout)
    experiment = client.get_experiment_by_name(_experiment(checkout))
    if experiment is None:
        return
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`{tracking.PIPELINE_TAG}` = '{key}' and tags.`{tracking.KIND_TAG}` = 'pipeline'"
        ),
        max_results=1,
    )
    if found:
        client.log_artifact(found[0].info.run_id, str(checkout / "dvc.lock"))
        client.log_dict(found[0].info.run_id, timing, "scale_out_tasks.json")


def _experiment(checkout: Path) -> str:
    params = yaml.safe_load((checkout / "params.yaml").read_text()) or {}
    return (params.get("common") or {}).get("mlflow_experiment") or "lepton"


def write_run_lock(workspace: Path, key: str) -> Path:
    """Write run ``key``'s dvc.lock from the remote into ``workspace`` (then ``dvc pull``
    brings its outputs)."""
    store = RunStore(workspace)
    text = store.read(key, "dvc.lock")
    if text is None:
        raise ScaleOutError(f"no dvc.lock for run {key} in {store.path(key)}")
    (workspace / "dvc.lock").write_bytes(text)
    files = store.read(key, "files.json")
    for path, data in json.loads(files or "{}").items():
        (workspace / path).parent.mkdir(parents=True, exist_ok=True)
        (workspace / path).write_bytes(base64.b64decode(data))
    return workspace / "dvc.lock"
