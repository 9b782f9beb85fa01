"""The same federation in process and on Flower's deployment engine (loopback): wall time.

    .venv/bin/python benchmarks/flower.py [--clients 3] [--rounds 3] [--local-epochs 1]
        [--out FILE.json]

Runs the federate stage's ``run`` twice on the same digits shards, start encoder and params
(``federate.runtime: simulation``, then ``flower``: a SuperLink and one SuperNode per shard
on 127.0.0.1, started from ``.venv-flower``) and records each wall time, the per-round val
accuracies (they should match) and the ratio. The Flower time includes starting the
deployment (a SuperLink, per site a SuperNode and a warm worker), shipping the app and three
messages each way a round through the SuperLink, which dominate at digits scale (the JSON
also splits the time to the first round from the time per later round);
``--local-epochs`` adds training per round to see the ratio fall.
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

from pipelines.config import CommonParams, FederateParams, Params  # noqa: E402
from pipelines.io import Paths  # noqa: E402
from tests.conftest import make_federation_workspace  # noqa: E402


class _Tracker:
    """Keeps the per-round metrics the stage logs; ignores the rest."""

    run_id = None  # no MLflow run: checkpoints carry no owner

    def __init__(self) -> None:
        self.rounds: list[float] = []
        self.arrivals: list[float] = []  # perf_counter when each round's metrics came

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        if "round_val_accuracy" in metrics:
            self.rounds.append(round(float(metrics["round_val_accuracy"]), 4))
            self.arrivals.append(time.perf_counter())

    def seconds_per_round(self) -> float | None:
        """Mean time between consecutive rounds' metrics: the steady round time, without
        start-up (``None`` with fewer than two rounds)."""
        if len(self.arrivals) < 2:
            return None
        return (self.arrivals[-1] - self.arrivals[0]) / (len(self.arrivals) - 1)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def make_workspace(root: Path, clients: int) -> Paths:
    """Digits: val (300 rows) and ``clients`` IID shards of the rest; an untrained encoder."""
    return make_federation_workspace(
        root, clients, val_rows=300, rows_per_client=None, embedding_dim=64, shuffle_seed=0
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "flower.json")
    args = parser.parse_args()
    from pipelines.stages import federate

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_workspace(Path(tmp) / "ws", args.clients)
        for runtime in ("simulation", "flower"):
            params = Params(
                common=CommonParams(seed=0, device="cpu"),
                federate=FederateParams(
                    rounds=args.rounds, local_epochs=args.local_epochs, runtime=runtime
                ),
            )
            tracker = _Tracker()
            print(f"{runtime} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            metrics = federate.run(params, paths, tracker)
            seconds = time.perf_counter() - started
            per_round = tracker.seconds_per_round()
            runs[runtime] = {
                "seconds": round(seconds, 2),
                "seconds_per_round_after_first": per_round and round(per_round, 2),
                "seconds_to_first_round": round(tracker.arrivals[0] - started, 2),
                "val_accuracy_per_round": tracker.rounds,
                "val_accuracy": round(metrics["val_accuracy"], 4),
            }
    payload = {
        **header("flower"),
        "clients": args.clients,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "runs": runs,
        "flower_over_simulation": round(
            runs["flower"]["seconds"] / runs["simulation"]["seconds"], 2
        ),
        "flower_over_simulation_per_round": (
            round(
                runs["flower"]["seconds_per_round_after_first"]
                / runs["simulation"]["seconds_per_round_after_first"],
                2,
            )
            if args.rounds > 1
            else None
        ),
        "same_val_accuracy_per_round": runs["flower"]["val_accuracy_per_round"]
        == runs["simulation"]["val_accuracy_per_round"],
    }
    write_json(args.out, payload)
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
