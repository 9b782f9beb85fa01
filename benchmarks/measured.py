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
