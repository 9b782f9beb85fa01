"""What one Lightning client fit costs besides its training steps.

    .venv/bin/python benchmarks/trainer_startup.py [--out benchmarks/results/trainer_startup.json]

Median milliseconds over repeated calls, in this project's environment:

- ``lightning_entry_point_scan``: Lightning's own ``_load_external_callbacks`` (run by every
  ``Trainer()``: it reads the entry points of every installed package);
- ``make_trainer``: the project's Trainer factory, which reads them once per process;
- ``tiny_client_fit``: ``train_client`` on one row for one epoch (one training step), i.e.
  the per-client cost of a federated round beyond its steps, plus one small step;
- ``training_step_batch_16``: one plain forward, backward and Adam step at batch 16, for
  scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_json import header, write_json  # noqa: E402 (sibling module)


def median_ms(function, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``function()`` in milliseconds."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return round(1000 * float(np.median(times)), 2)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "trainer_startup.json"
    )
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from lightning_fabric.utilities.registry import _load_external_callbacks
    from sklearn.datasets import load_digits

    from pipelines.config import FederateParams
    from pipelines.federated.fedavg import train_client
    from pipelines.io import ImageTable
    from pipelines.models.encoder import Classifier, build_encoder, encoder_config, to_tensor
    from pipelines.models.systems import make_trainer

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    torch.manual_seed(0)
    model = Classifier(build_encoder(encoder_config()), 10)
    state, config = model.state_dict(), model.config
    one_row = ImageTable(images[:1], labels[:1], 10)
    params = FederateParams(local_epochs=1)

    x, y = to_tensor(images[:16]), torch.from_numpy(labels[:16])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    results = {
        "lightning_entry_point_scan": median_ms(
            lambda: _load_external_callbacks("pytorch_lightning.callbacks_factory"), 20
        ),
        "make_trainer": median_ms(lambda: make_trainer(1, "cpu"), 50),
        "tiny_client_fit": median_ms(
            lambda: train_client(state, one_row, params, 0, "cpu", model_config=config), 50
        ),
        "training_step_batch_16": median_ms(step, 100),
    }
    payload = {
        **header("trainer_startup"),
        "median_ms": results,
    }
    write_json(args.out, payload)
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
