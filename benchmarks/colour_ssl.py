"""Why colour images scored lower: SimCLR on the colour contrast map (``pretrain.colour_input:
contrast``, the default; with and without the learning-rate warm-up) and on the RGB channels
with and without colour views, and the supervised ceiling of the same encoder on coloured
digits.

The ``rgb32`` example set (the digits at 32x32 in random foreground/background colours, as
``lepton example-data rgb32`` writes it) split as the partition stage's defaults split it
(K = 5, Dirichlet 0.5). For each SimCLR variant: the NT-Xent of the first and last epoch
against log(2B − 1) (the loss of embeddings that tell no view apart), and the kNN and
linear probes on val. Then the union of the client shards trained centrally with labels
(the federate stage's client step, ``train_client``: Adam, batch 32, 60 epochs), from a
random encoder and from each pretrained one, scored on test: what the model can reach on
these rows without federation. The grayscale 28x28 digits are the reference.

    .venv/bin/python benchmarks/colour_ssl.py [--epochs 60] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)

from pipelines.config import FederateParams, PartitionParams, PretrainParams  # noqa: E402
from pipelines.io import ImageTable, concat_tables  # noqa: E402

SUPERVISED = FederateParams(local_epochs=60, batch_size=32, learning_rate=0.002)


def example_table(name: str) -> ImageTable:
    """``rgb32`` or ``digits28`` as the ingest stage stores them (pixels in [0, 1])."""
    from pipelines.data.examples import coloured_digits, digits_28x28

    if name == "rgb32":
        images, labels = coloured_digits(32)
        images = images.transpose(0, 3, 1, 2)
    else:
        images, labels = digits_28x28()
    return ImageTable((images / 255.0).astype(np.float32), labels.astype(np.int64), 10)


def supervised(encoder, config, parts) -> dict:
    """Central supervised fit of the clients' rows from ``encoder`` (None: random init)."""
    import torch

    from pipelines.federated.fedavg import evaluate_accuracy, train_client
    from pipelines.models.encoder import build_classifier, classifier_config

    torch.manual_seed(0)
    model = build_classifier(classifier_config(config, 10))
    if encoder is not None:
        model.encoder.load_state_dict(encoder.state_dict())
    union = concat_tables(parts["clients"], 10)
    started = time.perf_counter()
    state, _, loss = train_client(
        model.state_dict(), union, SUPERVISED, 0, "cpu", model_config=model.config
    )
    model.load_state_dict(state)
    return {
        "test_accuracy": round(evaluate_accuracy(model.eval(), parts["test"], "cpu"), 4),
        "last_epoch_loss": round(loss, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=PretrainParams().epochs)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "colour_ssl.json"
    )
    args = parser.parse_args()
    from pipelines.models.augment import AugmentConfig
    from pipelines.models.encoder import encoder_config_for
    from pipelines.stages.partition import partition
    from pipelines.stages.pretrain import pretrain, probe_encoder

    p = PretrainParams(epochs=args.epochs)
    rgb = p.model_copy(update={"colour_input": "rgb"})
    variants = {
        "rgb32, contrast input (the default)": ("rgb32", AugmentConfig(), p),
        "rgb32, contrast input, no warm-up": (
            "rgb32",
            AugmentConfig(),
            p.model_copy(update={"warmup_epochs": 0}),
        ),
        "rgb32, rgb input, default views (colour views on half of them)": (
            "rgb32",
            AugmentConfig(),
            rgb,
        ),
        "rgb32, rgb input, no colour views": (
            "rgb32",
            dataclasses.replace(AugmentConfig(), colour_prob=0),
            rgb,
        ),
        "rgb32, rgb input, colour views on every view": (
            "rgb32",
            dataclasses.replace(AugmentConfig(), colour_prob=1.0),
            rgb,
        ),
        "digits28 (grayscale reference)": ("digits28", AugmentConfig(), p),
    }
    payload: dict = {
        **header("colour_ssl"),
        "pretrain_epochs": args.epochs,
        "batch_size": p.batch_size,
        "no_signal_loss": round(math.log(2 * p.batch_size - 1), 4),
        "supervised_fit": SUPERVISED.model_dump(
            include={"local_epochs", "batch_size", "learning_rate"}
        ),
        "sets": {},
        "variants": {},
    }
    splits = {}
    for name in ("rgb32", "digits28"):
        table = example_table(name)
        splits[name] = partition(table, PartitionParams(), 42)
        print(f"{name}: supervised from a random encoder ...", file=sys.stderr, flush=True)
        payload["sets"][name] = {}
        for colour_input in ("contrast", "rgb") if table.channels > 1 else ("contrast",):
            config = encoder_config_for(
                table.image_shape, table.channels, p.embedding_dim, colour_input
            )
            key = "supervised_from_random_init" + ("_rgb_input" if colour_input == "rgb" else "")
            payload["sets"][name][key] = supervised(None, config, splits[name])
    for label, (name, views, variant_params) in variants.items():
        print(f"{label} ...", file=sys.stderr, flush=True)
        parts = splits[name]
        started = time.perf_counter()
        encoder, losses = pretrain(
            parts["unlabeled"], variant_params, 42, "cpu", augment_config=views
        )
        seconds = time.perf_counter() - started
        probes = probe_encoder(encoder, concat_tables(parts["clients"], 10), parts["val"], 10)
        payload["variants"][label] = {
            "set": name,
            "first_epoch_loss": round(losses[0], 4),
            "last_epoch_loss": round(losses[-1], 4),
            **{k: round(v, 4) for k, v in probes.items()},
            "pretrain_seconds": round(seconds, 1),
            "supervised_from_this_encoder": supervised(encoder, encoder.config, parts),
        }
        print(payload["variants"][label], file=sys.stderr, flush=True)
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
