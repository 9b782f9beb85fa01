"""NT-Xent against a hand-written loop over the formula of the SimCLR paper."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.models.losses import NTXentLoss


def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """l(i, j) = -log(exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t)), mean over 2n."""
    z = [*z1.double(), *z2.double()]
    n = len(z1)

    def sim(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        numerator = math.exp(sim(z[i], z[positive]) / temperature)
        denominator = sum(math.exp(sim(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [2, 7])
def test_matches_hand_written_formula(n: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    z2 = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    expected = nt_xent_by_hand(z1, z2, temperature)
    assert NTXentLoss(temperature)(z1, z2).item() == pytest.approx(expected, rel=1e-9)
    # float32 (training precision) agrees to float32 accuracy
    assert NTXentLoss(temperature)(z1.float(), z2.float()).item() == pytest.approx(
        expected, rel=1e-4, abs=1e-6
    )


def test_scale_of_projections_does_not_matter() -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    criterion = NTXentLoss(0.3)
    assert criterion(z1, z2).item() == pytest.approx(criterion(3 * z1, 0.5 * z2).item())


def test_aligned_pairs_closed_form_and_temperature_effect() -> None:
    # pairs identical, all other rows orthogonal: every row's loss is
    # log(1 + (2n - 2) exp(-1 / t)), which falls as the temperature falls
    n = 4
    z = torch.eye(n, dtype=torch.float64)
    losses = {}
    for temperature in (0.1, 0.5, 1.0):
        losses[temperature] = NTXentLoss(temperature)(z, z).item()
        expected = math.log(1 + (2 * n - 2) * math.exp(-1 / temperature))
        assert losses[temperature] == pytest.approx(expected, rel=1e-9)
    assert losses[0.1] < losses[0.5] < losses[1.0]


def test_temperature_sharpens_the_penalty_on_confusable_negatives() -> None:
    # the negative is as close to the anchor as the positive: a low temperature cannot
    # separate them, so the loss stays near log(2) or above while aligned pairs go to 0
    z1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    z2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert NTXentLoss(0.05)(z1, z2).item() > math.log(2)


def test_gradient_flows_and_rejects_bad_input() -> None:
    z1 = torch.randn(3, 4, requires_grad=True)
    z2 = torch.randn(3, 4, requires_grad=True)
    NTXentLoss(0.2)(z1, z2).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    with pytest.raises(ValueError):
        NTXentLoss(0.2)(z1, z2[:2])
    with pytest.raises(ValueError):
        NTXentLoss(0.0)
