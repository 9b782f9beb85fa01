"""Record-level differential privacy at each client: DP-SGD on a linear head over fixed features.

Under ``federate.dp.unit: record`` the protected unit is one row of one client, not a whole
client. Each client trains only the linear head on features that cost no privacy (a fixed
scattering transform, or an encoder trained on public rows), with DP-SGD (Abadi et al., 2016):

- **Poisson sampling.** Each local step takes every row independently with probability
  ``q = federate.dp.sample_rate``; a local epoch is ``⌈1/q⌉`` steps.
- **Per-sample clipping, closed form.** For cross-entropy on ``z = W x + b`` the gradient of
  row ``i`` is ``(p_i - y_i) ⊗ [x_i, 1]``, whose L2 norm is ``‖p_i - y_i‖·√(‖x_i‖² + 1)``, so
  clipping to ``C`` and summing is two matrix products; no per-sample autograd is needed.
- **Gaussian noise** ``N(0, σ²C²)`` on every coordinate of the clipped sum, which is then
  divided by the **fixed divisor** ``q·n`` (the expected batch size), never by the batch's
  own size, which would depend on the sampled rows.

Each client keeps one :class:`ClientAccountant` for the whole run: the history of
``(σ, q, steps)`` it has spent, which travels with the client (in the simulation the client's
object, on Flower the ClientApp's ``context.state``) and is never rebuilt from the server's
view. ``ε`` is per client over all its local steps; the run reports the maximum over clients.
With ``target_epsilon``, :func:`plan_noise_multiplier` picks ``σ`` before training so that a
client sampled in every round ends the last round within budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

ACCOUNTANTS = ("rdp", "prv")
# Below this noise multiplier Opacus's PRV accountant needs an unbounded grid (it tried to
# allocate 946 GiB at σ = 1e-3); RDP, a valid if looser bound, answers there instead.
PRV_MIN_NOISE = 0.5


def local_steps(local_epochs: int, sample_rate: float) -> int:
    """DP-SGD steps one client takes per round: ``local_epochs`` epochs of ``⌈1/q⌉`` steps."""
    return int(local_epochs * math.ceil(1.0 / sample_rate))


def epsilon_for(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """``ε(δ)`` of a history of ``(σ, q, steps)`` under the ``rdp`` or ``prv`` accountant
    (RDP when some ``σ`` is below :data:`PRV_MIN_NOISE`)."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    import warnings

    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; one of {ACCOUNTANTS}")
    rdp = accountant == "rdp" or min(s for s, _, _ in history) < PRV_MIN_NOISE
    acc = RDPAccountant() if rdp else PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # RDP: "optimal order is the largest alpha" at large ε; PRV: log(0) at q = 1
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def plan_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prefix: list[tuple[float, float, int]] | None = None,
) -> float:
    """The smallest ``σ`` (to 0.1 %) whose ``ε`` after ``steps`` steps at rate ``q`` (after
    the steps of ``prefix``, already fixed) is within ``target_epsilon``: planned before the
    first round, for a client in every round."""
    fixed = list(prefix or [])

    def epsilon(sigma: float) -> float:
        return epsilon_for([*fixed, (sigma, sample_rate, steps)], delta, accountant)

    if epsilon(1e4) > target_epsilon:
        raise ValueError(
            f"no noise multiplier reaches ε = {target_epsilon:g}: the fixed releases alone "
            f"spend {epsilon_for(fixed, delta, accountant):.4g}"
        )
    low, high = 0.0, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, high * 2
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if epsilon(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


@dataclass
class ClientAccountant:
    """What one client has spent: its ``(σ, q, steps)`` history, kept across rounds."""

    delta: float
    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def spend(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record ``steps`` more steps of the sampled Gaussian mechanism."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + int(steps))
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        """Local DP-SGD steps taken so far."""
        return sum(n for _, _, n in self.history)

    def epsilon(self) -> float:
        """``ε`` at this accountant's ``δ`` over every step taken so far."""
        return epsilon_for(self.history, self.delta, self.accountant)

    def to_state(self) -> dict[str, Any]:
        """A JSON-able copy (what travels with the client between rounds)."""
        return {
            "delta": self.delta,
            "accountant": self.accountant,
            "history": [list(h) for h in self.history],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ClientAccountant:
        """The accountant :meth:`to_state` wrote."""
        return cls(
            float(state["delta"]),
            str(state["accountant"]),
            [(float(s), float(q), int(n)) for s, q, n in state["history"]],
        )


@dataclass(frozen=True)
class RecordDPSettings:
    """One client's DP-SGD settings for a round (all public, the same for every client)."""

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    learning_rate: float
    momentum: float = 0.9


def clipped_gradient_sum(
    weight: torch.Tensor,
    bias: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    clip_norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows of the per-row cross-entropy gradients of ``(weight, bias)``, each
    clipped to L2 norm ``clip_norm`` (closed form, float64)."""
    logits = features @ weight.T + bias
    residual = torch.softmax(logits, dim=1)
    residual[torch.arange(len(labels)), labels] -= 1.0
    norms = residual.norm(dim=1) * (features.square().sum(1) + 1.0).sqrt()
    factors = (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    scaled = residual * factors[:, None]
    return scaled.T @ features, scaled.sum(0)


def private_head_training(
    weight: torch.Tensor,
    bias: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    settings: RecordDPSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``settings.steps`` DP-SGD steps (Poisson sampling, clipping, noise, fixed divisor
    ``q·n``, SGD with momentum) on a linear head from ``(weight, bias)``; returns the new
    head. ``features`` ``(n, d)`` and ``weight`` ``(k, d)`` are float64."""
    weight, bias = weight.clone(), bias.clone()
    rows = len(labels)
    divisor = settings.sample_rate * rows
    velocity_w, velocity_b = torch.zeros_like(weight), torch.zeros_like(bias)
    sigma_c = settings.noise_multiplier * settings.clip_norm
    for _ in range(settings.steps):
        chosen = torch.rand(rows, generator=generator, dtype=torch.float64) < settings.sample_rate
        if chosen.any():
            grad_w, grad_b = clipped_gradient_sum(
                weight, bias, features[chosen], labels[chosen], settings.clip_norm
            )
        else:
            grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
        grad_w = grad_w + sigma_c * torch.randn(
            weight.shape, generator=generator, dtype=weight.dtype
        )
        grad_b = grad_b + sigma_c * torch.randn(bias.shape, generator=generator, dtype=bias.dtype)
        velocity_w = settings.momentum * velocity_w + grad_w / divisor
        velocity_b = settings.momentum * velocity_b + grad_b / divisor
        weight -= settings.learning_rate * velocity_w
        bias -= settings.learning_rate * velocity_b
    return weight, bias


def release_noisy_count(
    rows: int, noise_multiplier: float, generator: torch.Generator, accountant: ClientAccountant
) -> float:
    """``rows`` plus ``N(0, σ²)`` (sensitivity 1), at least 1; spends one Gaussian step at
    rate 1 in ``accountant``. A client's FedAvg weight under record-level DP."""
    noise = torch.randn((), generator=generator, dtype=torch.float64)
    accountant.spend(noise_multiplier, 1.0, 1)
    return max(1.0, float(rows + noise_multiplier * noise))


def generator_for(seed: int) -> torch.Generator:
    """A torch generator seeded with ``seed`` (sampling and noise of one client round)."""
    return torch.Generator().manual_seed(int(seed) % (2**63))


def as_float64(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Features as a float64 tensor (the private head trains in double precision)."""
    return torch.as_tensor(np.asarray(features), dtype=torch.float64)
