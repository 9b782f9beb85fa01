"""Federated strategies on digits: accuracy per round, centralized baseline, DP cost, overhead.

    .venv/bin/python benchmarks/federated.py [--out benchmarks/results/federated.json]
        [--rounds 36] [--clients 10] [--quick]

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
- **gap over seeds**: FedAvg minus centralized test accuracy on α = 0.5 for five seeds
  (each its own split, start head and client seeds), for the defaults and the variants of
  ``GAP_VARIANTS`` (fewer rounds, batch size, FedAdam); the centralized run always takes the
  variant's number of sample-gradient steps;
- **overhead**: the FedAvg run's wall time divided by that of the same local steps (the
  clients' batches, in order) run as one centralized Lightning fit, median of five pairs;
  the ratio to the full-batch centralized run is reported beside it.

Writes JSON, a Markdown table (``<out>.md``), one accuracy-per-round plot per split
(``<out stem>_<split>.png``) and the gap against rounds (``<out stem>_gap.png``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)

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
# FedAvg vs centralized on dirichlet_0.5 over these seeds (each: its own split, start head and
# client seeds; one pretrained encoder), for the defaults and these variants
GAP_SEEDS = (42, 1, 2, 3, 4)
GAP_VARIANTS = {
    "fedavg (defaults: 36 rounds, batch 16, client lr 0.002)": {},
    "fedavg, 24 rounds": {"rounds": 24},
    "fedavg, 12 rounds": {"rounds": 12},
    "fedavg, 12 rounds, batch 8": {"rounds": 12, "batch_size": 8},
    "fedavg, batch 32": {"batch_size": 32},
    "fedadam (server lr 0.01)": {"strategy": "fedadam", "server_learning_rate": 0.01},
}
OVERHEAD_REPEATS = 5


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
        "samples": int(sum(row["samples"] for row in history)),
        **({"epsilon": round(history[-1]["epsilon"], 4)} if "epsilon" in history[-1] else {}),
    }


def run_centralized(
    config, state, clients, val, test, params: FederateParams, seed: int, ddp: dict | None = None
):
    """One fit on the union of the clients for ``rounds × local_epochs`` epochs at the
    clients' batch size and learning rate: the sample-gradient steps of a federated run with
    every client in every round.

    With ``ddp`` (``{"devices": n, "num_nodes": m}``) the fit runs in Lightning DDP processes
    (:func:`pipelines.models.distributed.fit_classifier_distributed`), ``batch_size`` rows a
    step over all ranks."""
    import tempfile

    from pipelines.federated.fedavg import train_client
    from pipelines.io import concat_tables, write_image_table
    from pipelines.models.distributed import fit_classifier_distributed
    from pipelines.models.encoder import build_classifier

    union = concat_tables(clients, val.num_classes)
    epochs = params.rounds * params.local_epochs
    started = time.perf_counter()
    if ddp:
        fit = {
            "epochs": epochs,
            "batch_size": params.batch_size,
            "learning_rate": params.learning_rate,
            **ddp,
        }
        with tempfile.TemporaryDirectory(prefix="lepton-central-ddp-") as scratch:
            table = Path(scratch) / "union.parquet"
            write_image_table(union, table)
            model, _, _ = fit_classifier_distributed(
                table, config, state, fit, seed, "cpu", Path(scratch) / "out"
            )
    else:
        trained, _, _ = train_client(
            state,
            union,
            params.model_copy(update={"local_epochs": epochs}),
            seed,
            "cpu",
            model_config=config,
        )
        model = build_classifier(config)
        model.load_state_dict(trained)
        model.eval()
    seconds = time.perf_counter() - started
    return {
        "epochs": epochs,
        **({"ddp_processes": ddp["devices"] * ddp["num_nodes"]} if ddp else {}),
        "val_accuracy": round(accuracy(model, val), 4),
        "test_accuracy": round(accuracy(model, test), 4),
        "seconds": round(seconds, 2),
    }


def fit_batches(config, state, images, labels, batches, params: FederateParams) -> dict:
    """One Lightning fit of the classifier over ``batches`` (row indices) in order, with the
    clients' optimizer; returns the trained state."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipelines.models.encoder import build_classifier, to_tensor
    from pipelines.models.systems import ClassifierSystem, make_trainer

    model = build_classifier(config)
    model.load_state_dict(state)
    dataset = TensorDataset(to_tensor(images), torch.from_numpy(labels.astype(np.int64)))
    loader = DataLoader(dataset, sampler=batches, batch_size=None)
    make_trainer(1, "cpu").fit(ClassifierSystem(model, learning_rate=params.learning_rate), loader)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def gap_over_seeds(encoder, table, params: FederateParams, args) -> dict:
    """FedAvg (and variants) minus centralized test accuracy on Dirichlet α = 0.5, for each
    of ``GAP_SEEDS`` (the seed draws the split, the start head and the client seeds); the
    centralized run uses the variant's client learning rate, epochs and batch size."""
    from pipelines.models.systems import pl
    from pipelines.stages.partition import partition

    split = SPLITS["dirichlet_0.5"]
    starts = {}
    for seed in GAP_SEEDS:
        parts = partition(table, PartitionParams(num_clients=args.clients, **split), seed)
        starts[seed] = (parts, *start_state(encoder, parts["clients"], table.num_classes, seed))
    centralized: dict[tuple, float] = {}
    result = {"seeds": list(GAP_SEEDS), "variants": {}}
    for name, overrides in GAP_VARIANTS.items():
        if args.quick:  # a smoke run keeps its 2 rounds
            overrides = {k: v for k, v in overrides.items() if k != "rounds"}
        variant = params.model_copy(update=overrides)
        if variant.client_fraction < 1:
            raise ValueError(f"{name}: the centralized baseline assumes every client every round")
        rows = []
        for seed in GAP_SEEDS:
            print(f"gap over seeds: {name}, seed {seed} ...", file=sys.stderr, flush=True)
            parts, config, state = starts[seed]
            clients, val, test = parts["clients"], parts["val"], parts["test"]
            pl.seed_everything(seed, verbose=False)
            fed = run_federated(config, state, clients, val, test, variant, seed)
            key = (
                seed,
                variant.learning_rate,
                variant.rounds * variant.local_epochs,
                variant.batch_size,
            )
            if key not in centralized:
                centralized[key] = run_centralized(
                    config, state, clients, val, test, variant, 0, args.ddp
                )["test_accuracy"]
            rows.append(
                {
                    "seed": seed,
                    "federated_test_accuracy": fed["test_accuracy"],
                    "centralized_test_accuracy": centralized[key],
                    "gap_points": round(100 * (fed["test_accuracy"] - centralized[key]), 2),
                    "samples": fed["samples"],
                }
            )
        gaps = [row["gap_points"] for row in rows]
        result["variants"][name] = {
            "overrides": overrides,
            "rounds": variant.rounds,
            "runs": rows,
            "mean_gap_points": round(float(np.mean(gaps)), 2),
            "sd_gap_points": round(float(np.std(gaps, ddof=1)), 2),
        }
    return result


def client_batches(clients, params: FederateParams, seed: int) -> list[list[int]]:
    """Every local step of a federated run, in order, as row indices into the union of the
    clients: round by round, each sampled client's shuffled batches for each local epoch
    (the loader of :func:`~pipelines.federated.fedavg.train_client`, over row numbers)."""
    import torch

    from pipelines.federated.fedavg import client_seed, sample_clients
    from pipelines.models.systems import batch_loader

    offsets = np.cumsum([0] + [len(c) for c in clients])
    rng = np.random.default_rng(seed)
    batches: list[list[int]] = []
    for round_index in range(1, params.rounds + 1):
        for index in sample_clients(len(clients), params.client_fraction, rng):
            if len(clients[index]) == 0:
                continue
            loader = batch_loader(
                torch.arange(len(clients[index])) + int(offsets[index]),
                batch_size=params.batch_size,
                seed=client_seed(seed, round_index, index),
            )
            for _ in range(params.local_epochs):
                batches += [rows.tolist() for (rows,) in loader]
    return batches


def run_same_steps(config, state, clients, params: FederateParams, seed: int) -> dict:
    """The federated run's local steps (same batches, same order) as one centralized
    Lightning fit: the baseline for the simulation overhead."""
    images = np.concatenate([c.images for c in clients])
    labels = np.concatenate([c.labels for c in clients])
    batches = client_batches(clients, params, seed)
    started = time.perf_counter()
    fit_batches(config, state, images, labels, batches, params)
    return {"steps": len(batches), "seconds": round(time.perf_counter() - started, 2)}


def measure_overhead(config, state, clients, val, test, params: FederateParams, args) -> dict:
    """Wall time of the FedAvg run over :func:`run_same_steps` (its local steps as one
    centralized fit), median of ``OVERHEAD_REPEATS`` pairs, the order alternating within
    pairs; the full-batch centralized run (same sample-gradient steps, fewer and fuller
    batches) is timed beside them."""
    pairs = []
    for repeat in range(OVERHEAD_REPEATS):
        print(f"overhead pair {repeat + 1} of {OVERHEAD_REPEATS} ...", file=sys.stderr, flush=True)
        timed = {}
        runs = {
            "federated": lambda: run_federated(
                config, state, clients, val, test, params, args.seed
            ),
            "same_steps": lambda: run_same_steps(config, state, clients, params, args.seed),
        }
        for name in sorted(runs, reverse=repeat % 2 == 1):
            timed[name] = runs[name]()["seconds"]
        timed["centralized"] = run_centralized(config, state, clients, val, test, params, 0)[
            "seconds"
        ]
        pairs.append(timed)
    ratios = [p["federated"] / p["same_steps"] for p in pairs]
    middle = sorted(range(len(pairs)), key=lambda i: ratios[i])[len(pairs) // 2]
    full_batch = [p["federated"] / p["centralized"] for p in pairs]
    return {
        "federated_seconds": pairs[middle]["federated"],
        "same_steps_seconds": pairs[middle]["same_steps"],
        "steps": len(client_batches(clients, params, args.seed)),
        "ratio": round(ratios[middle], 3),
        "ratios": [round(r, 3) for r in ratios],
        # the least disturbed run of each: this VM's speed swings between runs of equal work
        "ratio_of_fastest": round(
            min(p["federated"] for p in pairs) / min(p["same_steps"] for p in pairs), 3
        ),
        "full_batch_centralized_steps": math.ceil(sum(len(c) for c in clients) / params.batch_size)
        * params.rounds
        * params.local_epochs,
        "ratio_vs_full_batch_centralized": round(float(np.median(full_batch)), 3),
        "ratios_vs_full_batch_centralized": [round(r, 3) for r in full_batch],
        "pairs": pairs,
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


def plot_gap(gap: dict, path: Path) -> None:
    """FedAvg − centralized (mean and sd over seeds, each seed a dot) against rounds, for
    the variants that differ from the defaults in rounds only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_rounds = sorted(
        (variant["rounds"], variant)
        for variant in gap["variants"].values()
        if set(variant["overrides"]) <= {"rounds"}
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r for r, _ in by_rounds]
    ax.errorbar(
        xs,
        [v["mean_gap_points"] for _, v in by_rounds],
        yerr=[v["sd_gap_points"] for _, v in by_rounds],
        marker="o",
        capsize=4,
        label="mean ± sd",
    )
    for r, variant in by_rounds:
        gaps = [row["gap_points"] for row in variant["runs"]]
        ax.scatter([r] * len(gaps), gaps, color="grey", s=12, zorder=3)
    ax.axhline(-1.5, color="red", ls="--", label="−1.5 points")
    ax.set_xticks(xs)
    ax.set_xlabel("rounds (2 local epochs, batch 16)")
    ax.set_ylabel("FedAvg − centralized test accuracy (points)")
    ax.set_title(f"digits, Dirichlet α = 0.5, seeds {', '.join(map(str, gap['seeds']))}")
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
        f"| dirichlet_0.5, seeds {', '.join(map(str, GAP_SEEDS))} | mean gap (points) | sd |"
        + " per seed |",
        "| --- | ---: | ---: | --- |",
    ]
    for name, variant in payload["gap_over_seeds"]["variants"].items():
        per_seed = ", ".join(f"{row['gap_points']:+.2f}" for row in variant["runs"])
        lines.append(
            f"| {name} | {variant['mean_gap_points']:+.2f} | {variant['sd_gap_points']:.2f}"
            f" | {per_seed} |"
        )
    dp = payload["dp"]
    lines += [
        "",
        f"DP (FedAvg, dirichlet_0.5): ε = {dp['epsilon']:.3f} (δ = {DELTA:g}), σ = "
        f"{dp['noise_multiplier']:.3f}, C = {dp['clip_norm']:.3f}: test accuracy "
        f"{dp['test_accuracy']:.4f} vs {dp['without_dp_test_accuracy']:.4f} without DP.",
        f"Simulation overhead (FedAvg, dirichlet_0.5, wall time / the same "
        f"{payload['overhead']['steps']} local steps as one centralized fit, median of "
        f"{OVERHEAD_REPEATS} pairs {payload['overhead']['ratios']}): "
        f"{payload['overhead']['ratio']:.2f}x ({payload['overhead']['federated_seconds']:.1f} s"
        f" / {payload['overhead']['same_steps_seconds']:.1f} s); fastest federated run / fastest "
        f"same-steps run: {payload['overhead']['ratio_of_fastest']:.2f}x. Against the full-batch "
        f"centralized run ({payload['overhead']['full_batch_centralized_steps']} steps, the "
        f"same sample-gradient steps): "
        f"{payload['overhead']['ratio_vs_full_batch_centralized']:.2f}x (median).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "federated.json"
    )
    parser.add_argument("--rounds", type=int, default=FederateParams().rounds)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 pretrain epochs")
    parser.add_argument(
        "--strategy",
        choices=("single", "ddp"),
        default="single",
        help="pretraining and the centralized baseline: one process, or Lightning DDP",
    )
    parser.add_argument("--devices", type=int, default=1, help="DDP processes per node")
    parser.add_argument("--num-nodes", type=int, default=1, help="DDP nodes (torchrun)")
    args = parser.parse_args()
    if args.strategy == "single" and (args.devices, args.num_nodes) != (1, 1):
        parser.error("--devices and --num-nodes above 1 need --strategy ddp")
    ddp = {"devices": args.devices, "num_nodes": args.num_nodes} if args.strategy == "ddp" else None
    args.ddp = ddp  # the centralized runs of every section but the overhead pairs
    logging.basicConfig(level=logging.WARNING)
    from pipelines.models.systems import pl
    from pipelines.stages.partition import partition
    from pipelines.stages.pretrain import pretrain

    args.out.parent.mkdir(parents=True, exist_ok=True)
    rounds = 2 if args.quick else args.rounds
    pretrain_params = PretrainParams(
        epochs=2 if args.quick else PretrainParams().epochs,
        strategy=args.strategy,
        devices=args.devices,
        num_nodes=args.num_nodes,
    )
    table = load_table()
    base = partition(table, PartitionParams(num_clients=args.clients, skew="iid"), args.seed)
    print(f"pretraining the encoder ({pretrain_params.epochs} epochs) ...", file=sys.stderr)
    encoder, _ = pretrain(base["unlabeled"], pretrain_params, args.seed, "cpu")

    payload: dict = {
        **header("federated"),
        "clients": args.clients,
        "rounds": rounds,
        "strategy": args.strategy,
        **({"ddp": ddp} if ddp else {}),
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
        result["centralized"] = run_centralized(config, state, clients, val, test, params, 0, ddp)
        payload["splits"][split] = result
        plot(split, result, args.out.with_name(f"{args.out.stem}_{split}.png"))

        if split == "dirichlet_0.5":
            payload["gap_over_seeds"] = gap_over_seeds(encoder, table, params, args)
            plot_gap(payload["gap_over_seeds"], args.out.with_name(f"{args.out.stem}_gap.png"))
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
            payload["overhead"] = measure_overhead(config, state, clients, val, test, params, args)

    write_json(args.out, payload)
    table_md = markdown(payload)
    args.out.with_suffix(".md").write_text(table_md)
    print(table_md)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
