"""Federated strategies on digits: accuracy per round, centralized baseline, DP cost, overhead.

    .venv/bin/python benchmarks/federated.py [--out benchmarks/results/federated.json]
        [--rounds 12] [--clients 10] [--quick]

One process, one pretrained encoder (SimCLR with the default pretrain params, on the
training pool), then for K clients and each label split (IID, Dirichlet α = 0.5, α = 0.1):
FedAvg, FedProx and FedAdam with the federate stage's defaults, each starting from the same
class-mean head. Beside them:

- **centralized**: the same model and start, trained by one Lightning fit on the union of the
  clients' rows for ``rounds × local_epochs`` epochs at the same batch size: the same number
  of sample-gradient steps as a federated run with every client in every round;
- **DP**: FedAvg on the α = 0.5 split with client-level DP at ε ≤ 8 (δ = 1e-5): σ is the
  smallest noise multiplier whose ε after all rounds is within 8, clip norm C = the median
  L2 norm of the clients' updates in the first clean round;
- **overhead**: the FedAvg run's wall time divided by the centralized run's (median of
  three pairs);
- **learning rates**: FedAvg and centralized on the α = 0.5 split at client learning rates
  0.001, 0.002 (the stage default) and 0.004.

Writes JSON, a Markdown table (``<out>.md``) and one accuracy-per-round plot per split
(``<out stem>_<split>.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.config import (  # noqa: E402
    DPParams,
    FederateParams,
    PartitionParams,
    PretrainParams,
)

SPLITS = {
    "iid": {"skew": "iid"},
    "dirichlet_0.5": {"skew": "dirichlet", "alpha": 0.5},
    "dirichlet_0.1": {"skew": "dirichlet", "alpha": 0.1},
}
STRATEGIES = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox", "proximal_mu": 0.01},
    "fedadam": {"strategy": "fedadam", "server_learning_rate": 0.01},
}
TARGET_EPSILON, DELTA = 8.0, 1e-5
# FedAvg vs centralized on dirichlet_0.5 at each client learning rate (the stage default is 0.002)
LEARNING_RATES = (0.001, 0.002, 0.004)
OVERHEAD_REPEATS = 3


def load_table():
    """Digits with pixels in [0, 1], as the partition stage makes them."""
    from sklearn.datasets import load_digits

    from pipelines.io import ImageTable

    data = load_digits()
    return ImageTable((data.images / 16.0).astype(np.float32), data.target.astype(np.int64), 10)


def start_state(encoder, clients, num_classes: int, seed: int):
    """Classifier from the pretrained encoder with its head set from class means."""
    from pipelines.federated.fedavg import init_head_from_class_means, start_classifier

    model = start_classifier(encoder, num_classes, seed)
    return model.config, init_head_from_class_means(
        model.config, model.state_dict(), clients, "cpu"
    )


def accuracy(model, table) -> float:
    """Accuracy of a classifier on a table."""
    from pipelines.federated.fedavg import evaluate_accuracy

    return evaluate_accuracy(model, table, "cpu")


def run_federated(config, state, clients, val, test, params: FederateParams, seed: int):
    """One federated run: per-round val accuracy, final test accuracy, seconds."""
    from pipelines.federated.fedavg import run_federation

    started = time.perf_counter()
    model, history = run_federation(config, state, clients, val, params, seed, "cpu")
    seconds = time.perf_counter() - started
    return {
        "val_accuracy_per_round": [round(row["val_accuracy"], 4) for row in history],
        "test_accuracy": round(accuracy(model, test), 4),
        "seconds": round(seconds, 2),
        **({"epsilon": round(history[-1]["epsilon"], 4)} if "epsilon" in history[-1] else {}),
    }


def run_centralized(config, state, clients, val, test, params: FederateParams, seed: int):
    """One fit on the union of the clients for ``rounds × local_epochs`` epochs."""
    from pipelines.federated.fedavg import train_client
    from pipelines.io import ImageTable
    from pipelines.models.encoder import build_classifier

    union = ImageTable(
        np.concatenate([c.images for c in clients]),
        np.concatenate([c.labels for c in clients]),
        val.num_classes,
    )
    epochs = params.rounds * params.local_epochs
    started = time.perf_counter()
    trained, _, _ = train_client(
        state,
        union,
        params.model_copy(update={"local_epochs": epochs}),
        seed,
        "cpu",
        model_config=config,
    )
    seconds = time.perf_counter() - started
    model = build_classifier(config)
    model.load_state_dict(trained)
    model.eval()
    return {
        "epochs": epochs,
        "val_accuracy": round(accuracy(model, val), 4),
        "test_accuracy": round(accuracy(model, test), 4),
        "seconds": round(seconds, 2),
    }


def median_update_norm(config, state, clients, params: FederateParams, seed: int) -> float:
    """Median L2 norm of the clients' updates in one clean round (the DP clip norm)."""
    from pipelines.federated.fedavg import client_seed, train_client
    from pipelines.federated.strategies import flatten_update

    norms = []
    for index, client in enumerate(clients):
        new_state, _, _ = train_client(
            state, client, params, client_seed(seed, 1, index), "cpu", model_config=config
        )
        norms.append(float(flatten_update(new_state, state).norm()))
    return float(np.median(norms))


def smallest_noise_within(target: float, rounds: int, sample_rate: float) -> float:
    """Smallest σ (to 1%) whose ε after ``rounds`` stays within ``target``."""
    from pipelines.federated.privacy import epsilon_after

    low, high = 0.3, 50.0
    while high / low > 1.01:
        middle = (low * high) ** 0.5
        if epsilon_after(rounds, middle, sample_rate, DELTA) <= target:
            high = middle
        else:
            low = middle
    return high


def plot(split: str, results: dict, path: Path) -> None:
    """Val accuracy per round of each strategy, the centralized result as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in results["strategies"].items():
        curve = run["val_accuracy_per_round"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.axhline(results["centralized"]["val_accuracy"], color="grey", ls="--", label="centralized")
    ax.set_xlabel("round")
    ax.set_ylabel("val accuracy")
    ax.set_title(f"digits, {split}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(payload: dict) -> str:
    """The tables for docs/benchmarks.md."""
    lines = [
        "| split | FedAvg | FedProx | FedAdam | centralized | FedAvg − centralized |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split, result in payload["splits"].items():
        s = result["strategies"]
        central = result["centralized"]["test_accuracy"]
        lines.append(
            f"| {split} | {s['fedavg']['test_accuracy']:.4f} | {s['fedprox']['test_accuracy']:.4f}"
            f" | {s['fedadam']['test_accuracy']:.4f} | {central:.4f}"
            f" | {100 * (s['fedavg']['test_accuracy'] - central):+.2f} points |"
        )
    lines += [
        "",
        "| client learning rate (dirichlet_0.5) | FedAvg | centralized | FedAvg − centralized |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in payload["learning_rate_sweep"]:
        gap = 100 * (row["fedavg_test_accuracy"] - row["centralized_test_accuracy"])
        lines.append(
            f"| {row['learning_rate']:g} | {row['fedavg_test_accuracy']:.4f}"
            f" | {row['centralized_test_accuracy']:.4f} | {gap:+.2f} points |"
        )
    dp = payload["dp"]
    lines += [
        "",
        f"DP (FedAvg, dirichlet_0.5): ε = {dp['epsilon']:.3f} (δ = {DELTA:g}), σ = "
        f"{dp['noise_multiplier']:.3f}, C = {dp['clip_norm']:.3f}: test accuracy "
        f"{dp['test_accuracy']:.4f} vs {dp['without_dp_test_accuracy']:.4f} without DP.",
        f"Simulation overhead (FedAvg, dirichlet_0.5, wall time / centralized with the same "
        f"sample-gradient steps, median of {OVERHEAD_REPEATS} pairs "
        f"{payload['overhead']['ratios']}): {payload['overhead']['ratio']:.2f}x "
        f"({payload['overhead']['federated_seconds']:.1f} s / "
        f"{payload['overhead']['centralized_seconds']:.1f} s).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "federated.json"
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 pretrain epochs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from pipelines.models.systems import pl
    from pipelines.stages.partition import partition
    from pipelines.stages.pretrain import pretrain

    rounds = 2 if args.quick else args.rounds
    pretrain_params = PretrainParams(epochs=2) if args.quick else PretrainParams()
    table = load_table()
    base = partition(table, PartitionParams(num_clients=args.clients, skew="iid"), args.seed)
    print(f"pretraining the encoder ({pretrain_params.epochs} epochs) ...", file=sys.stderr)
    encoder, _ = pretrain(base["unlabeled"], pretrain_params, args.seed, "cpu")

    payload: dict = {
        "benchmark": "federated",
        "command": "python benchmarks/federated.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "clients": args.clients,
        "rounds": rounds,
        "splits": {},
    }
    params = FederateParams(rounds=rounds)
    for split, settings in SPLITS.items():
        parts = partition(table, PartitionParams(num_clients=args.clients, **settings), args.seed)
        clients, val, test = parts["clients"], parts["val"], parts["test"]
        config, state = start_state(encoder, clients, table.num_classes, args.seed)
        result: dict = {"client_rows": [len(c) for c in clients], "strategies": {}}
        for name, overrides in STRATEGIES.items():
            print(f"{split}: {name} ...", file=sys.stderr, flush=True)
            pl.seed_everything(args.seed, verbose=False)
            result["strategies"][name] = run_federated(
                config, state, clients, val, test, params.model_copy(update=overrides), args.seed
            )
        print(f"{split}: centralized ...", file=sys.stderr, flush=True)
        result["centralized"] = run_centralized(config, state, clients, val, test, params, 0)
        payload["splits"][split] = result
        plot(split, result, args.out.with_name(f"{args.out.stem}_{split}.png"))

        if split == "dirichlet_0.5":
            payload["learning_rate_sweep"] = []
            for rate in LEARNING_RATES:
                print(f"{split}: FedAvg and centralized at lr {rate} ...", file=sys.stderr)
                swept = params.model_copy(update={"learning_rate": rate})
                pl.seed_everything(args.seed, verbose=False)
                fed = run_federated(config, state, clients, val, test, swept, args.seed)
                central = run_centralized(config, state, clients, val, test, swept, 0)
                payload["learning_rate_sweep"].append(
                    {
                        "learning_rate": rate,
                        "fedavg_test_accuracy": fed["test_accuracy"],
                        "centralized_test_accuracy": central["test_accuracy"],
                    }
                )
            print(f"{split}: FedAvg with DP ...", file=sys.stderr, flush=True)
            clip = median_update_norm(config, state, clients, params, args.seed)
            sigma = smallest_noise_within(TARGET_EPSILON, rounds, 1.0)
            dp = DPParams(enabled=True, clip_norm=clip, noise_multiplier=sigma, delta=DELTA)
            run = run_federated(
                config, state, clients, val, test, params.model_copy(update={"dp": dp}), args.seed
            )
            payload["dp"] = {
                "clip_norm": clip,
                "noise_multiplier": sigma,
                "without_dp_test_accuracy": result["strategies"]["fedavg"]["test_accuracy"],
                **run,
            }
            # wall times vary run to run on a shared VM: the median of three pairs
            pairs = []
            for repeat in range(OVERHEAD_REPEATS):
                print(f"{split}: overhead pair {repeat + 1} ...", file=sys.stderr, flush=True)
                fed = run_federated(config, state, clients, val, test, params, args.seed)
                central = run_centralized(config, state, clients, val, test, params, 0)
                pairs.append((fed["seconds"], central["seconds"]))
            ratios = [f / c for f, c in pairs]
            middle = sorted(range(len(pairs)), key=lambda i: ratios[i])[len(pairs) // 2]
            payload["overhead"] = {
                "federated_seconds": pairs[middle][0],
                "centralized_seconds": pairs[middle][1],
                "ratio": ratios[middle],
                "ratios": [round(r, 3) for r in ratios],
            }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    table_md = markdown(payload)
    args.out.with_suffix(".md").write_text(table_md)
    print(table_md)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
