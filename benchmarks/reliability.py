"""Kills survived: SIGKILL pretrain and federate over and over, and count what it cost.

For each case (pretrain; federate; federate under record-level DP, whose checkpoint also
holds every client's accountant), in a fresh workspace of digits shards
(tests/model/test_kill_resume.py's),
as DVC and Airflow run it: one uninterrupted run (its time), one shorter run whose outputs
are the *previous outputs*, then ``--kills`` attempts of the full run killed at seeded random
moments (tests/kill_harness.py) and one that finishes. It reports:

- kills survived out of kills tried: the outputs were the previous ones, or the finished
  ones when the attempt died after its commit, never a mix or a gap;
- bytes lost: the size of previous outputs that were missing or changed while no new
  result had replaced them;
- seconds of work redone per kill: the series' time, less the uninterrupted run's, over the
  kills (start-up of every rerun included; a kill after the commit makes the next attempt
  a whole new run), and epochs or rounds redone by a kill before the commit;
- whether the final weights equal the uninterrupted run's, bit for bit.

    .venv/bin/python benchmarks/reliability.py [--kills 10] [--cases ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)

from tests.conftest import run_stage  # noqa: E402
from tests.kill_harness import kill_until_done, outputs_digest, timed_run  # noqa: E402
from tests.model.test_kill_resume import (  # noqa: E402
    record_dp_workspace,
    set_param,
    stage_workspace,
)

# case: (stage, unit, total, weights, workspace builder)
CASES = {
    "federate": ("federate", "rounds", 8, "models/federate/model.safetensors", stage_workspace),
    "pretrain": ("pretrain", "epochs", 30, "models/pretrain/encoder.safetensors", stage_workspace),
    # its rounds take milliseconds: each attempt adds about one, so more rounds for 10 kills
    "federate_record_dp": (
        "federate",
        "rounds",
        16,
        "models/federate/model.safetensors",
        functools.partial(record_dp_workspace, rounds=16),
    ),
}


def measure(case: str, scratch: Path, kills: int, seed: int) -> dict:
    """One case's kill series and what it cost."""
    stage, unit, total, weights, workspace = CASES[case]
    root = workspace(scratch / case)
    outputs = [f"models/{stage}", f"reports/{stage}.json"]
    began = time.monotonic()
    timing = timed_run(root, stage)
    uninterrupted = time.monotonic() - began
    reference = (root / weights).read_bytes()
    set_param(root, stage, unit, 3)
    run_stage(root, stage)
    previous = outputs_digest(root, outputs)
    previous_bytes = sum((root / p).stat().st_size for p in previous)
    set_param(root, stage, unit, total)
    series = kill_until_done(
        root, stage, outputs, previous, timing, (weights, reference), kills=kills, seed=seed
    )
    broken = [k for k in series.kills if k.outputs == "broken"]
    # before the commit: what the attempt had reported beyond its checkpoint, plus the one
    # in progress (after the commit the stage is done; a rerun is a new run)
    redone = [
        max(0, k.reported - k.checkpointed) + 1 for k in series.kills if k.outputs == "previous"
    ]
    return {
        "stage": stage,
        unit: total,
        "kills_tried": len(series.kills),
        "kills_survived": len(series.kills) - len(broken),
        "killed_after_commit": sum(k.outputs == "new" for k in series.kills),
        "finished_before_their_kill": series.finished_early,
        "bytes_lost": previous_bytes if broken else 0,
        "uninterrupted_seconds": round(uninterrupted, 1),
        "series_seconds": round(series.seconds, 1),
        "seconds_redone_per_kill": round((series.seconds - uninterrupted) / len(series.kills), 1),
        f"{unit}_redone_per_kill_at_most": max(redone, default=0),
        "resumed_attempts": len(series.resumed_from),
        "final_weights_bit_identical": (root / weights).read_bytes() == reference,
        "kill_seconds": [round(k.seconds, 2) for k in series.kills],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="kills per case")
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="what to kill"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/reliability.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for case in args.cases:
            print(f"{case} ...", flush=True)
            results[case] = measure(case, Path(scratch), args.kills, args.seed)
            print(f"{case}: {results[case]}", flush=True)
    write_json(args.out, {**header("reliability"), "stages": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
