"""Seeding without Lightning draws what Lightning's seeding draws."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipelines.models.seeding import seed_everything
from tests.conftest import REPO


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
def test_seed_everything_draws_as_lightnings_does(seed: int):
    from lightning_fabric.utilities.seed import seed_everything as lightning_seed

    lightning_seed(seed, verbose=False)
    expected = _draws(), os.environ["PL_GLOBAL_SEED"], os.environ["PL_SEED_WORKERS"]
    _draws()  # move every generator on
    os.environ.pop("PL_GLOBAL_SEED")
    assert seed_everything(seed) == seed
    assert (_draws(), os.environ["PL_GLOBAL_SEED"], os.environ["PL_SEED_WORKERS"]) == expected


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_everything_refuses_a_seed_numpy_cannot_take(seed: int):
    with pytest.raises(ValueError, match="outside"):
        seed_everything(seed)


def test_seeding_imports_no_lightning():
    code = (
        "import sys; from pipelines.models.seeding import seed_everything; seed_everything(1); "
        "print(sorted(m for m in sys.modules if 'lightning' in m))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
