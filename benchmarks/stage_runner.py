"""A whole `lepton run` with each stage in a fresh process against stages forked from the
warm stage runner (`runtime.stage_runner`), on tiny params.

Each mode gets a fresh workspace (the same params, seed and data) and one `lepton run`
through Airflow; the pair is repeated ``--pairs`` times, alternating which mode goes first.
Records each run's wall time, each stage's own duration (``lepton stage run``'s, from
``.lepton/runs/<run>.jsonl``: imports included, Airflow and DVC around it not), and whether
the two modes wrote the same model files and the same ``reports/metrics.json`` (they
should: same code, same seed), apart from the latencies evaluate measures.

    .venv/bin/python benchmarks/stage_runner.py [--pairs 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)

from tests.conftest import BIN, TINY_OVERRIDES, make_workspace, workspace_env  # noqa: E402

MODES = {"fresh processes": "false", "stage runner": "true"}
TIMINGS = ("latency_ms_", "speedup_")  # measured, so never equal from run to run


def differences(a, b, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON documents."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            found += differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        return found
    return [] if a == b else [where]


def model_hashes(root: Path) -> dict[str, str]:
    """sha256 of every weights file under ``models/``, by path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((root / "models").rglob("*.safetensors"))
    }


def one_run(scratch: Path, name: str, runner: str) -> dict:
    """A fresh tiny workspace and one `lepton run` in it with ``runtime.stage_runner``."""
    root = make_workspace(scratch / name, TINY_OVERRIDES)
    argv = [str(BIN / "lepton"), "run", "--set", f"runtime.stage_runner={runner}"]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=root, env=workspace_env(root), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"lepton run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (record,) = (root / ".lepton" / "runs").glob("*.jsonl")
    stages = {}
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("status") == "ran":
            stages[entry["stage"]] = round(entry["seconds"], 2)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    return {
        "seconds": round(seconds, 1),
        "stage_seconds": stages,
        "stage_seconds_total": round(sum(stages.values()), 1),
        "models": model_hashes(root),
        "metrics": metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1, help="runs of each mode")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/stage_runner.json")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        for pair in range(args.pairs):
            order = list(MODES) if pair % 2 == 0 else list(reversed(MODES))
            for mode in order:
                print(f"pair {pair + 1}: {mode} ...", flush=True)
                result = one_run(Path(scratch), f"{pair}-{MODES[mode]}", MODES[mode])
                print(f"  {result['seconds']} s", flush=True)
                runs[mode].append(result)
    fresh, warm = runs["fresh processes"], runs["stage runner"]
    pairs = list(zip(fresh, warm, strict=True))
    same_models = all(a["models"] == b["models"] for a, b in pairs)
    differing = sorted({key for a, b in pairs for key in differences(a["metrics"], b["metrics"])})
    untimed = [key for key in differing if not key.rsplit(".", 1)[-1].startswith(TIMINGS)]
    summary = {
        mode: {
            "run_seconds": [r["seconds"] for r in results],
            "run_seconds_median": statistics.median(r["seconds"] for r in results),
            "stage_seconds_total": [r["stage_seconds_total"] for r in results],
            "stage_seconds": [r["stage_seconds"] for r in results],
        }
        for mode, results in runs.items()
    }
    payload = {
        **header("stage_runner"),
        "params": "tiny (tests/conftest.py TINY_OVERRIDES)",
        "modes": summary,
        "run_speedup": round(
            summary["fresh processes"]["run_seconds_median"]
            / summary["stage runner"]["run_seconds_median"],
            2,
        ),
        "same_model_files": same_models,
        "metrics_that_differ": differing,
        "same_metrics_but_latencies": not untimed,
        "model_files": len(fresh[0]["models"]),
    }
    write_json(args.out, payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "modes"}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
