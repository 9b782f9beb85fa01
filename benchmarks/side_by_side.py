"""Concurrent runs held: several pipeline runs with different params at once on one workspace.

A tiny-params workspace is first run once (``lepton run --via dvc``). Then, all at once:
``--isolated`` runs with ``federate.rounds`` = 1, 2, ... (``--runs``) and, in the
workspace itself, ``lepton run --via dvc --set federate.rounds=<runs + 1>`` and a plain
``lepton run --via dvc`` (it queues behind the other on the workspace's lock). It reports
how many finished, how many printed a DVC lock error, whether each run's federate report
has its own rounds, which stages each run restored rather than ran, when each ended, and
the wall time. (A ``dvc repro`` started by hand beside a ``lepton run`` is in
tests/e2e/test_pipeline.py.)

    .venv/bin/python benchmarks/side_by_side.py [--runs 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)

from tests.conftest import BIN, TINY_OVERRIDES, make_workspace, workspace_env  # noqa: E402
from tests.e2e.test_pipeline import DVC_LOCK_ERRORS, summary_status  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="isolated runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/side_by_side.json")
    args = parser.parse_args()
    lepton = [str(BIN / "lepton"), "run", "--via", "dvc"]
    with tempfile.TemporaryDirectory() as tmp:
        root = make_workspace(Path(tmp) / "ws", TINY_OVERRIDES)
        env = workspace_env(root)
        print("first run ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        subprocess.run(lepton, cwd=root, env=env, capture_output=True, check=True)
        first_seconds = time.perf_counter() - started

        commands = {f"isolated rounds={r}": [*lepton, "--isolated", "--set", f"federate.rounds={r}"]
                    for r in range(1, args.runs + 1)}  # fmt: skip
        here_rounds = args.runs + 1
        commands[f"in place rounds={here_rounds}"] = [
            *lepton,
            "--set",
            f"federate.rounds={here_rounds}",
        ]
        commands["in place, queued"] = lepton
        print(f"{len(commands)} runs at once ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        processes, ended = {}, {}
        for name, argv in commands.items():
            log = Path(tmp) / f"{len(processes)}.log"
            processes[name] = (subprocess.Popen(argv, cwd=root, env=env, stdout=log.open("w"),
                                                stderr=subprocess.STDOUT), log)  # fmt: skip
        while len(ended) < len(processes):  # each run's own end, whatever the order
            for name, (process, _log) in processes.items():
                if name not in ended and process.poll() is not None:
                    ended[name] = time.perf_counter() - started
            time.sleep(0.2)
        wall = time.perf_counter() - started

        runs = {}
        for name, (process, log) in processes.items():
            text = log.read_text()
            status = summary_status(text)
            rounds = None
            if name.startswith("isolated"):
                work = Path(re.search(r"run workspace: (\S+)", text).group(1))
                rounds = json.loads((work / "reports/federate.json").read_text())["rounds"]
            elif name.startswith("in place rounds"):
                rounds = json.loads((root / "reports/federate.json").read_text())["rounds"]
            runs[name] = {
                "exit_code": process.returncode,
                "seconds": round(ended[name], 1),
                "dvc_lock_error_shown": any(error in text for error in DVC_LOCK_ERRORS),
                "waited": "waiting" in text or "trying again" in text,
                "federate_rounds_in_report": rounds,
                "stages_restored": sorted(s for s, v in status.items() if v == "cached"),
                "stages_ran": sorted(s for s, v in status.items() if v == "ran"),
            }
    payload = {
        **header("side_by_side"),
        "first_run_seconds": round(first_seconds, 1),
        "runs_at_once": len(commands),
        "finished": sum(r["exit_code"] == 0 for r in runs.values()),
        "dvc_lock_errors_shown": sum(r["dvc_lock_error_shown"] for r in runs.values()),
        "wall_seconds": round(wall, 1),
        "runs": runs,
    }
    write_json(args.out, payload)
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
