"""Federated SimCLR against central SimCLR and a random encoder: probes and fine-tuned accuracy.

The digits split as the partition stage's defaults split them (K = 5, Dirichlet 0.5, seed
42). Three encoders: central SimCLR on the unlabeled pool (the pretrain defaults), federated
SimCLR at the five clients on their own shards (``pretrain.mode: federated`` with its
defaults), and a randomly initialised one. For each: the kNN and linear probes on val
(fitted on the clients' labeled rows) and the test accuracy after the federate stage's
fine-tuning with its defaults.

    .venv/bin/python benchmarks/federated_ssl.py [--case digits8|digits28]
        [--client-temperature T] [--federated KEY=VALUE ...] [--probe-every N]
        [--seed S] [--skip-central] [--out FILE.json]

``--federated`` overrides a pretrain setting of the federated run (``local_epochs=5``,
``rounds=60``, ``client_batch_size=128``, ``client_warmup_steps=0``); ``--probe-every N``
also records the federated encoder's kNN probe every N rounds (``federated_knn_by_round``;
its pretrain seconds then include the probes). ``--seed`` seeds the encoders' starts,
training and fine-tuning (the split stays seed 42's); ``--skip-central`` leaves central
SimCLR out.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)

from pipelines.config import FederateParams, PartitionParams, PretrainParams  # noqa: E402
from pipelines.io import ImageTable, concat_tables  # noqa: E402


def load_case(name: str) -> ImageTable:
    """``digits8`` (bundled 8x8) or ``digits28`` (x3 bilinear, 2-pixel pad), pixels in [0, 1]."""
    if name == "digits8":
        from sklearn.datasets import load_digits

        data = load_digits()
        return ImageTable((data.images / 16).astype(np.float32), data.target, 10)
    from pipelines.data.examples import digits_28x28

    images, labels = digits_28x28()
    return ImageTable((images / 255).astype(np.float32), labels, 10)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=("digits8", "digits28"), default="digits8")
    parser.add_argument(
        "--client-temperature",
        type=float,
        default=PretrainParams().client_temperature,
        help="pretrain.client_temperature of the federated run",
    )
    parser.add_argument(
        "--federated",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="pretrain settings of the federated run (e.g. local_epochs=5 rounds=60)",
    )
    parser.add_argument("--probe-every", type=int, default=0, help="kNN probe every N rounds")
    parser.add_argument(
        "--seed", type=int, default=42, help="seed of the encoders and fine-tuning (split: 42)"
    )
    parser.add_argument(
        "--skip-central", action="store_true", help="only the federated and random encoders"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or REPO / "benchmarks" / "results" / f"federated_ssl_{args.case}.json"
    from pipelines.federated.fedavg import evaluate_accuracy
    from pipelines.federated.ssl import pretrain_federated
    from pipelines.models.encoder import build_encoder, encoder_config_for
    from pipelines.models.systems import pl
    from pipelines.stages.federate import federate
    from pipelines.stages.partition import partition
    from pipelines.stages.pretrain import pretrain, probe_encoder

    table = load_case(args.case)
    parts = partition(table, PartitionParams(), 42)
    clients, val, test = parts["clients"], parts["val"], parts["test"]
    labeled = concat_tables(clients, 10)
    central = PretrainParams()
    overrides = dict(item.split("=", 1) for item in args.federated)
    federated = PretrainParams(
        mode="federated", client_temperature=args.client_temperature, **overrides
    )
    knn_by_round: dict[int, float] = {}
    rounds_done = itertools.count(1)

    def probe_rounds(model) -> None:
        done = next(rounds_done)
        if args.probe_every and done % args.probe_every == 0:
            probes = probe_encoder(model.encoder.eval(), labeled, val, central.knn_k, "cpu")
            knn_by_round[done] = round(probes["val_knn_accuracy"], 4)
            print(f"round {done}: val kNN {knn_by_round[done]}", file=sys.stderr, flush=True)

    def random_encoder(_clients, p, seed):
        pl.seed_everything(seed, verbose=False)
        config = encoder_config_for(table.image_shape, table.channels, p.embedding_dim)
        return build_encoder(config).eval(), []

    encoders = {
        "central SimCLR (unlabeled pool)": lambda: pretrain(
            parts["unlabeled"], central, args.seed, "cpu"
        ),
        "federated SimCLR (clients' own shards)": lambda: pretrain_federated(
            clients, federated, args.seed, "cpu", watch=probe_rounds
        ),
        "random encoder": lambda: random_encoder(clients, central, args.seed),
    }
    if args.skip_central:
        del encoders["central SimCLR (unlabeled pool)"]
    payload: dict = {
        **header("federated_ssl"),
        "case": args.case,
        "seed": args.seed,
        "client_rows": [len(c) for c in clients],
        "central": central.model_dump(include={"epochs", "batch_size", "learning_rate"}),
        "federated": federated.model_dump(
            include={
                "rounds",
                "local_epochs",
                "client_batch_size",
                "client_temperature",
                "client_warmup_steps",
                "learning_rate",
            }
        ),
        "encoders": {},
    }
    for name, make in encoders.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        encoder, losses = make()
        seconds = time.perf_counter() - started
        probes = probe_encoder(encoder, labeled, val, central.knn_k, "cpu")
        pl.seed_everything(args.seed, verbose=False)
        model, _ = federate(encoder, clients, val, FederateParams(), args.seed, "cpu")
        payload["encoders"][name] = {
            **{k: round(v, 4) for k, v in probes.items()},
            "fine_tuned_test_accuracy": round(evaluate_accuracy(model, test, "cpu"), 4),
            "pretrain_seconds": round(seconds, 1),
            **({"last_loss": round(losses[-1], 4)} if losses else {}),
        }
        print(payload["encoders"][name], file=sys.stderr, flush=True)
    if knn_by_round:
        payload["federated_knn_by_round"] = knn_by_round
    write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
