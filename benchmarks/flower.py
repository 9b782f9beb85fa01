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
``--local-epochs`` adds training per round to see the ratio fall. Each run also records the
CPU seconds of the stage's process and of every process under it, by process (the
deployment's parts are named; ``cores_busy`` is CPU seconds over wall seconds).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

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


def _name_of(process: psutil.Process, previous: str = "") -> str:
    """A process's name now (the parts that the deployment forks rename themselves), with
    ``flwr``'s command (``flwr run``, ``flwr log``) and the SuperLink's script (its comm is
    cut at 15 characters) spelled out; ``previous`` where the command is gone (a zombie)."""
    name, cmdline = process.name(), process.cmdline()
    if not cmdline:  # exited, not yet reaped
        return previous or name
    command = [Path(part).name for part in cmdline[1:3]]
    if name == "flwr":
        return " ".join(["flwr", *command[1:]])
    if command[:1] == ["flower-superlink"]:
        return "flower-superlink"
    return name


class CpuSampler:
    """CPU seconds of this process and of every process under it, by process name, read
    every ``interval`` s while in use (a process that lives shorter than that can be
    missed). The loopback deployment names the parts it forks (``supernode-0``,
    ``site-worker-0``, ``superexec``, ``app-zygote``, ``clientapp``, ``serverapp``; the
    index is dropped here); ``flwr`` runs are told apart by their command."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.seen: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._me = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for process in self._me.children(recursive=True):
                try:
                    with process.oneshot():
                        name = _name_of(process, self.seen.get(process.pid, ("",))[0])
                        times = process.cpu_times()
                        self.seen[process.pid] = (name, times.user + times.system)
                except psutil.Error:
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> CpuSampler:
        times = self._me.cpu_times()
        self._own = times.user + times.system
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        times = self._me.cpu_times()
        self.own = times.user + times.system - self._own

    def by_process(self) -> dict[str, float]:
        """CPU seconds by process name (``this process``: the stage's), largest first."""
        totals: dict[str, float] = {"this process": self.own}
        for name, seconds in self.seen.values():
            if seconds < 0.005:  # short helpers (uname, file) that Python's platform runs
                continue
            key = re.sub(r"-\d+$", "", name)
            totals[key] = totals.get(key, 0.0) + seconds
        return dict(sorted(((k, round(v, 2)) for k, v in totals.items()), key=lambda kv: -kv[1]))


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
            with CpuSampler() as cpu:
                metrics = federate.run(params, paths, tracker)
            seconds = time.perf_counter() - started
            by_process = cpu.by_process()
            cpu_seconds = sum(by_process.values())
            per_round = tracker.seconds_per_round()
            runs[runtime] = {
                "seconds": round(seconds, 2),
                "seconds_per_round_after_first": per_round and round(per_round, 2),
                "seconds_to_first_round": round(tracker.arrivals[0] - started, 2),
                "val_accuracy_per_round": tracker.rounds,
                "val_accuracy": round(metrics["val_accuracy"], 4),
                "cpu_seconds": round(cpu_seconds, 2),
                "cores_busy": round(cpu_seconds / seconds, 2),
                "cpu_seconds_by_process": by_process,
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
