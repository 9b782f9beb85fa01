"""Run one command in a benchmark workspace and measure it: wall time and peak RSS.

Scripts import it as a sibling module (``from measured import run_measured``), like
``results_json``. Peak RSS is GNU time's maximum resident set size: the largest of the
command's process and the children it waited for.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import workspace_env  # noqa: E402


def run_measured(argv: list[str], root: Path) -> dict:
    """Run ``argv`` in workspace ``root``; return ``seconds``, ``peak_rss_mb`` and ``stdout``.
    A failure stops the benchmark with the command's output."""
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *argv],
        cwd=root,
        env=workspace_env(root),
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(
            f"{' '.join(argv)} failed in {root}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    peak_kb = int(done.stderr.strip().splitlines()[-1])
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "stdout": done.stdout,
    }


def params_overrides(sets: list[str]) -> dict:
    """``section.key=value`` strings (values parsed as YAML) as a params overrides dict."""
    import yaml

    overrides: dict = {}
    for item in sets:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        overrides.setdefault(section, {})[field] = yaml.safe_load(value)
    return overrides


def case_arguments(description: str, cases, default_out: Path):
    """The command line every whole-pipeline benchmark takes: ``--cases`` (comma-separated
    names of ``cases``), ``--set section.key=value`` (repeatable) and ``--out``."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", default=",".join(cases), help="comma-separated case names")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value")
    parser.add_argument("--out", type=Path, default=default_out)
    return parser.parse_args()


def run_cases(names: str, run_case, sets: list[str], summary=lambda result: result) -> dict:
    """``run_case(name, scratch, sets)`` for every comma-separated name in one scratch
    folder, printing each case's ``summary`` as JSON; name → result."""
    import json
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names.split(","):
            print(f"{name} ...", flush=True)
            results[name] = run_case(name, Path(scratch), sets)
            print(f"{name}: {json.dumps(summary(results[name]))}", flush=True)
    return results
