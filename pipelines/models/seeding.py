"""Seeding every generator a run draws from, without importing Lightning.

Lightning's ``seed_everything`` does the same, but importing Lightning takes seconds, which
a process that trains nothing would pay just to seed: the stage's own process on Flower, or a
ServerApp that Flower's SuperExec starts fresh at a remote SuperLink and that builds the
record-level classifier (:func:`pipelines.federated.fedavg.start_classifier`).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

_MAX_SEED = np.iinfo(np.uint32).max  # NumPy's global generator takes 0 .. 2**32 - 1


def seed_everything(seed: int) -> int:
    """Seed Python's ``random``, NumPy's global generator and torch (every device) with
    ``seed``, and set ``PL_GLOBAL_SEED`` and ``PL_SEED_WORKERS=0`` for Lightning, as
    ``lightning.seed_everything(seed, verbose=False)`` does; returns ``seed``. Raises
    ValueError outside 0 .. 2**32 - 1."""
    seed = int(seed)
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed {seed} is outside 0 .. {_MAX_SEED}")
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PL_SEED_WORKERS"] = "0"
    return seed
