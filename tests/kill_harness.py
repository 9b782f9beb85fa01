"""SIGKILL a stage over and over until it finishes; what each kill cost.

Used by ``tests/model/test_kill_resume.py`` and ``benchmarks/reliability.py``. The stage
runs as DVC and Airflow run it (``lepton stage run NAME`` in a workspace). Each attempt is
killed (the whole process group, as an OOM killer or a preempted node would) at a seeded
random moment; the next attempt starts right after, until one finishes.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.conftest import BIN, workspace_env

PROGRESS = {
    "federate": re.compile(r"round (\d+)/\d+ val_accuracy"),
    "pretrain": re.compile(r"epoch (\d+)/\d+ train_loss"),
}
RESUMED = re.compile(r"resuming after (?:round|epoch) (\d+)")


def outputs_digest(root: Path, outputs: list[str]) -> dict[str, str]:
    """sha256 of every file under ``outputs`` (folders or files, relative to ``root``)."""
    found = {}
    for out in outputs:
        path = root / out
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.is_file():
                found[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def checkpoint_progress(root: Path, stage: str) -> int:
    """The round or epoch the stage's checkpoint holds (0 without one)."""
    from pipelines.checkpoints import CHECKPOINT_DIR, Checkpoint

    found = list((root / CHECKPOINT_DIR).glob(f"{stage}-*.safetensors"))
    if not found:
        return 0
    meta = Checkpoint(found[0]).load()[1]
    return int(meta.get("round", meta.get("epoch", 0)))


@dataclass
class KillRecord:
    """One killed attempt: when it died, what it had reported, what the checkpoint held,
    and what the outputs were after it: ``previous`` (as before the series), ``new`` (the
    finished result: the attempt died after its commit) or ``broken`` (anything else)."""

    seconds: float
    reported: int
    checkpointed: int
    outputs: str


@dataclass
class KillSeries:
    """Every attempt of a kill series; ``finished_log`` is the last attempt's output;
    ``finished_early`` counts attempts that finished before their kill came."""

    kills: list[KillRecord] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    finished_early: int = 0
    finished_log: str = ""
    seconds: float = 0.0


STARTED = re.compile(r"stage \w+ started")


@dataclass(frozen=True)
class StageTiming:
    """An uninterrupted run's pace: seconds to the start-up marker (``stage X started``),
    from there to its first epoch or round done, and per later epoch or round."""

    startup: float
    first_unit: float
    per_unit: float


def timed_run(root: Path, stage: str, stage_runner: bool = True) -> StageTiming:
    """Run the stage once to the end and time it (see :class:`StageTiming`);
    ``stage_runner`` as in :func:`tests.conftest.workspace_env`."""
    began = time.monotonic()
    proc = subprocess.Popen(
        [str(BIN / "lepton"), "stage", "run", stage],
        cwd=root,
        env=workspace_env(root, stage_runner),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started, units = None, []
    for line in proc.stdout:
        now = time.monotonic() - began
        if started is None and STARTED.search(line):
            started = now
        if PROGRESS[stage].search(line):
            units.append(now)
    if proc.wait() != 0 or started is None or len(units) < 2:
        raise RuntimeError(f"{stage} failed or reported fewer than two epochs or rounds")
    return StageTiming(started, units[0] - started, (units[-1] - units[0]) / (len(units) - 1))


def latest_progress(stage: str, text: str) -> int:
    """The highest epoch or round an attempt's log reports (0 before the first)."""
    return max((int(unit) for unit in PROGRESS[stage].findall(text)), default=0)


def kill_until_done(
    root: Path,
    stage: str,
    outputs: list[str],
    previous: dict[str, str],
    timing: StageTiming,
    final: tuple[str, bytes],
    kills: int = 10,
    seed: int = 0,
    as_airflow_task: bool = False,
    stage_runner: bool = True,
) -> KillSeries:
    """Run ``lepton stage run <stage>`` in ``root`` until ``kills`` attempts have been
    killed; the next one runs to its end. After each kill the outputs are compared with
    ``previous`` (their digest before the series) and ``final`` (the path of the weights
    file and the bytes it holds when the stage has finished).

    Every fourth attempt dies during start-up, a seeded random time before an
    uninterrupted run reported its first epoch or round (``timing``): in the imports, the
    data loading or the first epoch or round (never later than its first new report). The
    others die a random time up to two epochs or rounds after they report their first new
    one (not one replayed from the checkpoint): in an epoch or round, a checkpoint write
    or, after the last one, the final output writes. The time is drawn from the
    uninterrupted run's pace, and the kill comes at the latest when the attempt reports
    the second epoch or round after its first new one, so a machine that got faster or
    slower since ``timing`` moves the kill within those two, never past them.

    An attempt can still finish before its kill (it resumed near the end): it is counted
    in ``finished_early`` and the series goes on, as a new run of the stage over the
    finished outputs, until ``kills`` attempts were killed.

    ``as_airflow_task``: run what the DAG's task runs instead, ``python -m
    pipelines.stage_task <stage>`` (``dvc repro --single-item``), each attempt with the next
    try number, as Airflow's retries do.

    ``stage_runner``: each attempt is forked from the test session's warm stage runner (as
    ``lepton run`` runs its stages; the attempt's client is what is killed, and the runner
    kills the forked stage with it) instead of starting in a process of its own, which
    imports MLflow, torch and Lightning first (the kills during start-up then come in
    those imports)."""
    rng = np.random.default_rng(seed)
    series = KillSeries()
    start = time.monotonic()
    attempt = 0
    while True:
        log_path = root / ".lepton" / f"kill-{stage}-{attempt}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(BIN / "lepton"), "stage", "run", stage]
        env = workspace_env(root, stage_runner)
        if as_airflow_task:
            argv = [str(BIN / "python"), "-m", "pipelines.stage_task", stage]
            env.update(LEPTON_TASK_TRY=str(attempt + 1), LEPTON_DVC=str(BIN / "dvc"))
        last = len(series.kills) == kills  # the last attempt runs to its end
        during_startup = len(series.kills) % 4 == 3
        if during_startup:
            delay = rng.uniform(0.2, timing.startup + timing.first_unit)
        else:
            delay = rng.uniform(0.0, 2 * timing.per_unit)
        done_before = checkpoint_progress(root, stage)
        with log_path.open("w") as log:
            began = time.monotonic()
            proc = subprocess.Popen(
                argv,
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            if last:
                proc.wait()
            deadline = began + delay if during_startup else None
            first_new = None
            while proc.poll() is None:
                now = time.monotonic()
                newest = latest_progress(stage, log_path.read_text())
                if newest > done_before:
                    if during_startup:
                        break  # past start-up: die now, never later
                    if first_new is None:
                        first_new, deadline = newest, now + delay
                    if newest >= first_new + 2:
                        break  # the pace quickened since the timed run: the latest kill
                if deadline is not None and now >= deadline:
                    break
                time.sleep(0.01)
            killed = proc.poll() is None
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            lasted = time.monotonic() - began
        attempt += 1
        text = log_path.read_text()
        series.resumed_from += [int(r) for r in RESUMED.findall(text)]
        if not killed:
            if proc.returncode != 0:
                raise RuntimeError(f"{stage} failed:\n{text[-3000:]}")
            if last:
                series.finished_log = text
                series.seconds = time.monotonic() - start
                return series
            series.finished_early += 1
            continue
        reported = [int(r) for r in PROGRESS[stage].findall(text)]
        series.kills.append(
            KillRecord(
                seconds=lasted,
                reported=max(reported, default=0),
                checkpointed=checkpoint_progress(root, stage),
                outputs=outputs_state(root, outputs, previous, final),
            )
        )


def outputs_state(
    root: Path, outputs: list[str], previous: dict[str, str], final: tuple[str, bytes]
) -> str:
    """``previous``, ``new`` or ``broken``: see :class:`KillRecord`."""
    now = outputs_digest(root, outputs)
    if now == previous:
        return "previous"
    weights, content = final
    if set(now) == set(previous) and (root / weights).read_bytes() == content:
        return "new"
    return "broken"
