"""Server side of a federated round: screening, aggregation and the server update.

A client's *update* is its trained state minus the global state it started from, flattened
over the floating-point tensors into one float64 vector (integer buffers such as BatchNorm's
counters are not averaged: the global model keeps its own). A round then

1. screens the updates (:func:`screen_updates`): a non-finite update or one whose L2 norm is
   above ``max_update_norm`` is rejected, with the client and the reason;
2. aggregates the accepted ones (:data:`AGGREGATORS`): the sample-weighted ``mean``
   (FedAvg), or a robust rule for untrusted clients: coordinate-wise ``median``,
   ``trimmed_mean`` (drop the ``β`` share of largest and smallest values per coordinate),
   ``krum`` / multi-Krum (Blanchard et al., 2017: the ``m`` updates closest to their
   ``n - f - 2`` nearest neighbours, averaged);
3. applies the aggregate with a server optimizer (:class:`ServerOptimizer`): ``sgd`` adds
   it times the server learning rate (1 = FedAvg / FedProx), ``adam`` treats its negative as
   a gradient (FedAdam, Reddi et al., 2021).

FedProx is FedAvg's server with a proximal term on the clients
(:class:`~pipelines.models.systems.ClassifierSystem`'s ``proximal_mu``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors of ``state``, in order."""
    return [key for key, value in state.items() if value.is_floating_point()]


def flatten_update(
    client_state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``client - global`` over the floating-point tensors, as one float64 vector."""
    parts = [
        (
            client_state[key].detach().cpu().double() - global_state[key].detach().cpu().double()
        ).reshape(-1)
        for key in float_keys(global_state)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def apply_update(global_state: Mapping[str, torch.Tensor], update: torch.Tensor) -> StateDict:
    """``global + update`` (floating-point tensors); other tensors copied from ``global``."""
    expected = sum(v.numel() for v in global_state.values() if v.is_floating_point())
    if update.numel() != expected:
        raise ValueError(f"update has {update.numel()} values, the state holds {expected}")
    new_state: StateDict = {}
    offset = 0
    for key, value in global_state.items():
        if value.is_floating_point():
            size = value.numel()
            delta = update[offset : offset + size].reshape(value.shape)
            new_state[key] = (value.detach().cpu().double() + delta).to(value.dtype)
            offset += size
        else:
            new_state[key] = value.detach().cpu().clone()
    return new_state


@dataclass(frozen=True)
class Rejection:
    """A client update left out of a round, and why."""

    client: int
    reason: str


def screen_updates(
    clients: list[int], updates: list[torch.Tensor], max_update_norm: float | None
) -> tuple[list[int], list[Rejection]]:
    """Positions (into ``updates``) of the acceptable updates, and the rejections.

    Rejected: any non-finite value; an L2 norm above ``max_update_norm`` (when set).
    """
    accepted, rejected = [], []
    for position, (client, update) in enumerate(zip(clients, updates, strict=True)):
        if not bool(torch.isfinite(update).all()):
            bad = int((~torch.isfinite(update)).sum())
            rejected.append(Rejection(client, f"{bad} non-finite values"))
            continue
        norm = float(update.norm())
        if max_update_norm is not None and norm > max_update_norm:
            rejected.append(
                Rejection(client, f"update norm {norm:.4g} above the bound {max_update_norm:g}")
            )
            continue
        accepted.append(position)
    return accepted, rejected


def weighted_mean(updates: torch.Tensor, weights: torch.Tensor, **_: float) -> torch.Tensor:
    """FedAvg: the mean of the rows of ``updates`` weighted by ``weights``."""
    weights = weights.double()
    return (updates * (weights / weights.sum())[:, None]).sum(0)


def coordinate_median(updates: torch.Tensor, weights: torch.Tensor, **_: float) -> torch.Tensor:
    """Coordinate-wise median of the updates (the mean of the two middle values when even)."""
    return updates.double().quantile(0.5, dim=0)


def trimmed_mean(
    updates: torch.Tensor, weights: torch.Tensor, trim_fraction: float = 0.1, **_: float
) -> torch.Tensor:
    """Per coordinate, drop the ``trim_fraction`` share of largest and smallest values
    (``floor(trim_fraction * n)`` each side), average the rest."""
    n = updates.shape[0]
    cut = int(math.floor(trim_fraction * n))
    if n - 2 * cut < 1:
        raise ValueError(f"trimming {cut} of {n} updates at each end leaves none")
    ordered = updates.double().sort(dim=0).values
    return ordered[cut : n - cut].mean(0)


def krum(
    updates: torch.Tensor,
    weights: torch.Tensor,
    byzantine_clients: int = 1,
    krum_selected: int = 1,
    **_: float,
) -> torch.Tensor:
    """(Multi-)Krum: average of the ``krum_selected`` updates whose summed squared distance
    to their ``n - f - 2`` nearest neighbours is smallest (``f = byzantine_clients``)."""
    n = updates.shape[0]
    f = int(byzantine_clients)
    neighbours = n - f - 2
    if neighbours < 1:
        raise ValueError(f"Krum with f={f} needs at least f + 3 = {f + 3} updates, got {n}")
    x = updates.double()
    distances = torch.cdist(x, x).pow(2)
    distances.fill_diagonal_(float("inf"))
    scores = distances.sort(dim=1).values[:, :neighbours].sum(1)
    chosen = scores.argsort()[: max(1, min(int(krum_selected), n))]
    return x[chosen].mean(0)


Aggregator = Callable[..., torch.Tensor]
AGGREGATORS: dict[str, Aggregator] = {
    "mean": weighted_mean,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
}
# Robust rules need the individual updates (secure aggregation only reveals their sum).
ROBUST_AGGREGATORS = ("median", "trimmed_mean", "krum")


def min_updates_for(aggregator: str, trim_fraction: float, byzantine_clients: int) -> int:
    """Fewest accepted updates ``aggregator`` can combine."""
    if aggregator == "krum":
        return byzantine_clients + 3
    if aggregator == "trimmed_mean":
        # smallest n with n - 2 * floor(trim_fraction * n) >= 1
        n = 1
        while n - 2 * math.floor(trim_fraction * n) < 1:
            n += 1
        return n
    return 1


@dataclass
class ServerOptimizer:
    """Applies the aggregate update to the global model: ``sgd`` or ``adam`` (FedAdam).

    ``sgd``: ``w += lr * Δ`` (lr 1 is plain FedAvg). ``adam``: with ``g = -Δ``,
    ``m = β1 m + (1 - β1) g``, ``v = β2 v + (1 - β2) g²``, ``w -= lr * m / (sqrt(v) + τ)``
    (FedAdam of Reddi et al., without bias correction, as in the paper).
    """

    kind: str = "sgd"
    learning_rate: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    _m: torch.Tensor | None = field(default=None, repr=False)
    _v: torch.Tensor | None = field(default=None, repr=False)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """FedAdam's moments (none for ``sgd`` or before the first step), for checkpoints."""
        if self._m is None:
            return {}
        return {"m": self._m, "v": self._v}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned."""
        self._m, self._v = tensors.get("m"), tensors.get("v")

    def step(self, aggregate: torch.Tensor) -> torch.Tensor:
        """The update to add to the global weights for this round's ``aggregate``."""
        if self.kind == "sgd":
            return self.learning_rate * aggregate
        if self.kind != "adam":
            raise ValueError(f"unknown server optimizer '{self.kind}'")
        gradient = -aggregate.double()
        if self._m is None:
            self._m = torch.zeros_like(gradient)
            self._v = torch.zeros_like(gradient)
        self._m = self.beta1 * self._m + (1 - self.beta1) * gradient
        self._v = self.beta2 * self._v + (1 - self.beta2) * gradient.pow(2)
        return -self.learning_rate * self._m / (self._v.sqrt() + self.tau)
