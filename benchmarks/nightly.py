"""The unchanged nightly run: `lepton run` when nothing changed since the last run.

Makes a fresh workspace (tiny params unless --full, since which stages ran first does not
matter to a run that skips them all), runs the pipeline once through Airflow, then times
--repeats more `lepton run`s with nothing changed. Each of those must report every stage
cached. It also times the pieces such a run is made of: Airflow's CLI start-up, one no-op
`dvc repro --single-item` and the source probe.

    .venv/bin/python benchmarks/nightly.py [--repeats 3] [--full] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)

from pipelines.orchestration import airflow_env  # noqa: E402
from pipelines.registry import STAGE_NAMES  # noqa: E402
from tests.conftest import BIN, TINY_OVERRIDES, make_workspace, workspace_env  # noqa: E402


def timed(argv: list[str], root: Path, env: dict[str, str]) -> tuple[float, str]:
    """Seconds and output of one command; a failure stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="unchanged runs to time")
    parser.add_argument("--full", action="store_true", help="default params, not tiny ones")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/nightly.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = make_workspace(Path(scratch) / "ws", None if args.full else TINY_OVERRIDES)
        env = workspace_env(root)
        lepton = [str(BIN / "lepton"), "run"]
        print("first run (every stage runs) ...", flush=True)
        first, _ = timed(lepton, root, env)
        runs = []
        for k in range(args.repeats):
            seconds, stdout = timed(lepton, root, env)
            cached = [line.split()[0] for line in stdout.splitlines() if " cached " in line]
            if sorted(cached) != sorted(STAGE_NAMES):
                sys.exit(f"run {k + 1} did not skip every stage:\n{stdout[-3000:]}")
            runs.append(round(seconds, 2))
            print(f"unchanged run {k + 1}: {seconds:.1f} s (every stage cached)", flush=True)
        air_env = {**env, **airflow_env(root)}
        airflow_cli, _ = timed([str(BIN / "airflow"), "version"], root, air_env)
        dvc_noop, _ = timed([str(BIN / "dvc"), "repro", "--single-item", "compress"], root, env)
        probe, _ = timed([str(BIN / "lepton"), "dvc", "fingerprint-source"], root, env)

    payload = {
        **header("nightly"),
        "params": "default" if args.full else "tiny (tests/conftest.py TINY_OVERRIDES)",
        "first_run_seconds": round(first, 1),
        "unchanged_run_seconds": runs,
        "unchanged_run_median_seconds": round(statistics.median(runs), 2),
        "parts_seconds": {
            "airflow_cli_startup": round(airflow_cli, 2),
            "dvc_repro_single_item_noop": round(dvc_noop, 2),
            "source_probe": round(probe, 2),
        },
    }
    write_json(args.out, payload)
    print(f"median unchanged run {payload['unchanged_run_median_seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
