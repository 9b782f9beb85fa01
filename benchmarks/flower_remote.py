"""Remote sites against the in-process simulation on the same rows: accuracy and wall time.

    .venv/bin/python benchmarks/flower_remote.py [--rounds 12] [--out FILE.json]

Splits the digits into the server's rows (600: val, test and the pretraining pool) and
three sites' rows, starts a TLS SuperLink with SuperNode authentication and three
`lepton site join` processes (each on its own NPZ file in its own folder), runs ingest →
partition → pretrain → federate in remote mode in a fresh workspace (default params but
``federate.rounds``), then federates the same sites' prepared rows in process from the same
encoder (once more with ``federate.augment`` off, to show what the clients' random views
cost at this number of rounds), and records the val accuracies, each site's held-out
accuracy and the wall times.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)


def main() -> int:
    from tests.conftest import run_stage
    from tests.e2e.test_flower_remote import (
        digits_split,
        remote_workspace,
        running_federation,
        simulate_same_rows,
    )

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "flower_remote.json"
    )
    args = parser.parse_args()

    sites, (server_x, server_y) = digits_split()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with running_federation(tmp, sites) as (superlink, certs):
            root = remote_workspace(
                tmp, (server_x, server_y), superlink, certs, {"federate": {"rounds": args.rounds}}
            )
            seconds = {}
            for stage in ("ingest", "compress", "partition", "pretrain", "federate"):
                started = time.perf_counter()
                run_stage(root, stage, timeout=3600)  # fails with the stage's output
                seconds[stage] = round(time.perf_counter() - started, 1)
                print(f"{stage}: {seconds[stage]} s", flush=True)
        remote = json.loads((root / "reports/federate.json").read_text())
        reported = json.loads((root / "models/federate/sites.json").read_text())
        started = time.perf_counter()
        simulated = simulate_same_rows(root, tmp / "sites")
        simulation_seconds = time.perf_counter() - started
        # the same, without the clients' random views: what augmentation costs at these rounds
        unaugmented = simulate_same_rows(root, tmp / "sites", {"augment": False})
    result = {
        **header("flower_remote"),
        "sites": len(sites),
        "rounds": args.rounds,
        "server_rows": int(len(server_y)),
        "site_rows": {name: int(len(y)) for name, (_, y) in sites.items()},
        "remote": {
            "val_accuracy": round(remote["val_accuracy"], 4),
            "federate_seconds": seconds["federate"],
            "stage_seconds": seconds,
            "site_holdout_accuracy": {s["site"]: round(s["holdout_accuracy"], 4) for s in reported},
        },
        "simulation_same_rows": {
            "val_accuracy": round(simulated, 4),
            "seconds": round(simulation_seconds, 1),
        },
        "simulation_same_rows_without_augment": {"val_accuracy": round(unaugmented, 4)},
        "accuracy_difference": round(remote["val_accuracy"] - simulated, 4),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
