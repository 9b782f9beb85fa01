"""Client-level differential privacy (DP-FedAvg) and the privacy ledger.

DP-FedAvg (McMahan et al., 2018): each sampled client's update is clipped to L2 norm ``C``;
the server sums the clipped updates, adds Gaussian noise ``N(0, (σ·C)² I)`` and divides by
the number of clients sampled per round. One round is one step of the sampled Gaussian
mechanism at sampling rate ``q = sampled clients / K``; Opacus's RDP accountant turns the
rounds into ``ε`` for a given ``δ``. Clients are sampled as a fixed-size subset each round,
which the accountant treats as Poisson sampling at rate ``q`` (the usual approximation in
federated DP; documented in docs/federated.md).

The **ledger** keeps the ``ε`` spent on each data version (the content hash of the clients'
union) across pipeline runs, in the MLflow store: every private ``federate`` run tags
``lepton.privacy.data_sha256`` when its training starts, logs ``round_epsilon`` (its ``ε``
so far) each round and ``privacy.epsilon_spent`` when it finishes; the total is the sum over
those runs (sequential composition, the conservative bound). A run that did not finish (a
kill, a failure) released its rounds all the same, so it counts with the last
``round_epsilon`` it logged, unless a later run resumed from its checkpoint: that run's
accountant went on from it, and it tags the one it resumed ``lepton.privacy.carried_by``
(:func:`ledger_spend`). ``federate`` refuses a run that would take the total past
``privacy.max_epsilon``; ``register`` refuses to promote a model whose ``ε`` is above it.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from pipelines.errors import LeptonError

DATA_TAG = "lepton.privacy.data_sha256"
EPSILON_METRIC = "privacy.epsilon_spent"
ROUND_EPSILON_METRIC = "round_epsilon"  # a run's ε so far, logged each round
CARRIED_TAG = "lepton.privacy.carried_by"  # on a run a later run resumed: that run's id
EPSILON_TAG = "lepton.privacy.epsilon"


class PrivacyBudgetError(LeptonError):
    """A run would spend more privacy budget than ``privacy.max_epsilon`` allows."""


def clip_update(update: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``update`` scaled down to L2 norm ``clip_norm`` when it is longer."""
    norm = float(update.norm())
    return update * (clip_norm / norm) if norm > clip_norm else update


def private_mean(
    updates: list[torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``(Σ clip(update) + N(0, (σ·C)²)) / expected_clients`` (DP-FedAvg's server step)."""
    total = torch.stack([clip_update(u.double(), clip_norm) for u in updates]).sum(0)
    noise = torch.randn(total.shape, generator=generator, dtype=torch.float64)
    return (total + noise * noise_multiplier * clip_norm) / expected_clients


def epsilon_after(rounds: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    """``ε(δ)`` after ``rounds`` steps of the sampled Gaussian mechanism (Opacus RDP)."""
    if rounds <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta))


def rounds_within(
    target_epsilon: float, rounds: int, noise_multiplier: float, sample_rate: float, delta: float
) -> int:
    """Most rounds (at most ``rounds``) whose ``ε`` stays within ``target_epsilon``."""
    low, high = 0, rounds
    while low < high:  # ε grows with the rounds: binary search the last round within
        middle = (low + high + 1) // 2
        if epsilon_after(middle, noise_multiplier, sample_rate, delta) <= target_epsilon:
            low = middle
        else:
            high = middle - 1
    return low


def ledger_spend(run, final_metric: str) -> float:
    """The ``ε`` an MLflow ``run`` adds to the ledger: ``final_metric`` when it finished;
    nothing when a later run resumed it (``lepton.privacy.carried_by``: that run's ``ε``
    includes its rounds); else the last ``round_epsilon`` it logged (a killed or failed run
    released its rounds; a run still going counts what it has spent so far)."""
    metrics = run.data.metrics
    if run.info.status == "FINISHED":
        return float(metrics.get(final_metric, 0.0))
    if CARRIED_TAG in run.data.tags:
        return 0.0
    return float(metrics.get(ROUND_EPSILON_METRIC, 0.0))


def spent_epsilon(
    mlflow_client, experiment_ids: list[str], data_sha256: str, carried: Collection[str] = ()
) -> float:
    """Total ``ε`` the ledger holds for data version ``data_sha256`` (:func:`ledger_spend`
    of every run tagged with it but the ``carried`` run ids: a run about to resume them)."""
    runs = mlflow_client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{DATA_TAG}` = '{data_sha256}'",
        max_results=10_000,
    )
    return float(
        sum(ledger_spend(run, EPSILON_METRIC) for run in runs if run.info.run_id not in carried)
    )


def check_budget(spent: float, planned: float, max_epsilon: float | None, data: str) -> None:
    """Raise :class:`PrivacyBudgetError` when ``spent + planned`` exceeds ``max_epsilon``."""
    if max_epsilon is None:
        return
    if math.isinf(planned):
        raise PrivacyBudgetError(
            f"privacy.max_epsilon is {max_epsilon:g} but federate.dp is off: a run without "
            f"differential privacy spends an unbounded ε on data {data[:12]}"
        )
    if spent + planned > max_epsilon:
        raise PrivacyBudgetError(
            f"privacy budget exceeded for data {data[:12]}: {spent:.4g} spent + {planned:.4g} "
            f"planned > privacy.max_epsilon {max_epsilon:g}"
        )


# Record-level DP: the ledger keeps ε per client data version (the content hash of the
# client's shard), as one metric per client on each private federate run.
CLIENT_EPSILON_PREFIX = "privacy.client_epsilon."
UNIT_TAG = "lepton.privacy.unit"
DELTA_TAG = "lepton.privacy.delta"


def client_epsilon_key(data_sha256: str) -> str:
    """The MLflow metric holding a run's ``ε`` on the client whose shard hashes to this."""
    return CLIENT_EPSILON_PREFIX + data_sha256


def spent_epsilon_by_client(
    mlflow_client,
    experiment_ids: list[str],
    client_hashes: list[str],
    carried: Collection[str] = (),
) -> dict[str, float]:
    """Total ``ε`` the ledger holds for each client data version (:func:`ledger_spend` of
    every run with the client's metric: a record-level run logs it as 0 when its training
    starts, and its final value when it finishes; until then ``round_epsilon``, the largest
    ``ε`` of its clients, stands for each), but the ``carried`` run ids."""
    spent = {}
    for data_sha256 in client_hashes:
        key = client_epsilon_key(data_sha256)
        runs = mlflow_client.search_runs(
            experiment_ids, filter_string=f"metrics.`{key}` >= 0", max_results=10_000
        )
        spent[data_sha256] = float(
            sum(ledger_spend(run, key) for run in runs if run.info.run_id not in carried)
        )
    return spent


def check_client_budgets(
    spent: dict[str, float], names: dict[str, str], planned: float, max_epsilon: float | None
) -> None:
    """Raise :class:`PrivacyBudgetError` naming the first client (``names``: hash → shard
    file) that this run's ``planned`` ε would take past ``max_epsilon``."""
    if max_epsilon is None:
        return
    for data_sha256, before in spent.items():
        if before + planned > max_epsilon:
            raise PrivacyBudgetError(
                f"privacy budget exceeded for client {names[data_sha256]} (data "
                f"{data_sha256[:12]}): {before:.4g} spent + {planned:.4g} planned > "
                f"privacy.max_epsilon {max_epsilon:g}"
            )
