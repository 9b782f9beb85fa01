"""Time every stage on the default params: seconds, peak RSS and samples/s.

Runs each stage as its own process (`lepton stage run NAME`, as DVC and Airflow do) in a
fresh copy of the workspace, so process start-up (imports) is part of the time.

    .venv/bin/python benchmarks/stages.py [--out benchmarks/results/stages.json] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import write_json  # noqa: E402 (sibling module)

from pipelines.registry import STAGES  # noqa: E402
from tests.conftest import make_workspace, workspace_env  # noqa: E402

# Which rows a stage processes, to turn seconds into samples/s.
ROWS_KEY = {
    "ingest": ("ingest", "rows"),
    "compress": ("ingest", "rows"),
    "partition": ("ingest", "rows"),
    "pretrain": ("partition", "train_rows"),
    "federate": ("partition", "labeled_rows"),
    "quantum": ("quantum", "train_samples"),
    "optimize": ("partition", "val_rows"),
    "evaluate": ("partition", "test_rows"),
    "register": None,
}


def measure(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS MiB of the process tree, output tail) of one command.

    The command's output goes to a temporary file, not a pipe: a stage logs more than a pipe
    buffer holds, and nobody reads the pipe while the process tree is being sampled.
    """
    with tempfile.TemporaryFile(mode="w+") as output:
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=output, stderr=output, text=True)
        root = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        output.seek(0)
        tail = output.read()[-2000:]
    return process.returncode, seconds, peak / 2**20, tail


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stages.json")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="section.key=value"
    )
    args = parser.parse_args()

    overrides: dict = {}
    for text in args.overrides:
        key, _, value = text.partition("=")
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = (
            json.loads(value) if value[:1] in "[{0123456789-tf" else value
        )

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_workspace(Path(tmp) / "ws", overrides or None)
        env = workspace_env(root)
        env["LEPTON_PIPELINE_RUN"] = "benchmark"
        lepton = str(Path(sys.executable).parent / "lepton")
        for stage in STAGES:
            code, seconds, peak, err = measure([lepton, "stage", "run", stage.name], root, env)
            if code != 0:
                print(err, file=sys.stderr)
                return code
            row = {
                "stage": stage.name,
                "seconds": round(seconds, 2),
                "peak_rss_mib": round(peak, 1),
            }
            if ROWS_KEY[stage.name]:
                report, key = ROWS_KEY[stage.name]
                path = root / (
                    "reports/metrics.json" if report == "evaluate" else f"reports/{report}.json"
                )
                rows = json.loads(path.read_text()).get(key)
                if rows:
                    row["rows"] = rows
                    row["samples_per_s"] = round(rows / seconds, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
        metrics = json.loads((root / "reports" / "metrics.json").read_text())

    payload = {
        "benchmark": "stages",
        "command": "python benchmarks/stages.py " + " ".join(f"--set {o}" for o in args.overrides),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "total_seconds": round(sum(r["seconds"] for r in results), 1),
        "test_accuracy": metrics.get("test_accuracy"),
        "chosen_variant": metrics.get("chosen_variant"),
        "stages": results,
    }
    write_json(args.out, payload)
    print(
        f"wrote {args.out}: total {payload['total_seconds']} s,"
        f" test accuracy {payload['test_accuracy']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
