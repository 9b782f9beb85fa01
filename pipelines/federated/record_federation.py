"""FedAvg under record-level DP: private linear heads over fixed features, one accountant each.

The round loop of ``federate.dp.unit: record`` (mechanism and accounting in
:mod:`pipelines.federated.record_dp`). What each client releases, and nothing else:

- once, before the first round, its row count plus Gaussian noise
  (``federate.dp.count_noise_multiplier``; sensitivity 1, accounted as one step), which the
  server uses as the client's FedAvg weight;
- each round it is sampled in, its head after the round's DP-SGD steps;
- its ``ε`` so far, a function of public settings and of the rounds it took part in.

Before the first round the server centres the features on its own val rows and may project
them onto their top principal directions (``federate.dp.feature_components``,
:mod:`pipelines.federated.feature_projection`): a public map, sent to every client, that
costs no privacy; the released head folds it back onto the encoder's features.

Its training loss, accuracy and true row count are never sent. The server averages the heads
(weights: the noisy counts), applies the mean with ``federate.server_learning_rate`` and keeps
an exponential moving average of the global head over the rounds
(``federate.dp.average_decay``, post-processing: free in privacy), which is the released
model and what val scores each round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.config import DPParams, FederateParams
from pipelines.federated.feature_projection import FeatureProjection, fit_feature_projection
from pipelines.federated.record_dp import (
    ClientAccountant,
    RecordDPSettings,
    as_float64,
    epsilon_for,
    generator_for,
    local_steps,
    plan_noise_multiplier,
    private_head_training,
    release_noisy_count,
)
from pipelines.io import ImageTable, TableStream, batches_with_labels

if TYPE_CHECKING:
    from pipelines.checkpoints import Checkpoint

log = logging.getLogger(__name__)

COUNT_RELEASE = "count"  # the seed stream of a client's noisy row count


def count_release_step(dp: DPParams) -> tuple[float, float, int]:
    """The accountant entry of the noisy row count: one Gaussian step at rate 1."""
    return (dp.count_noise_multiplier, 1.0, 1)


@dataclass(frozen=True)
class RecordPlan:
    """The noise and length of a record-level run, fixed before the first round."""

    noise_multiplier: float
    steps_per_round: int
    rounds: int
    epsilon: float  # of a client sampled in every round (the most any client can spend)


def plan_record_run(p: FederateParams) -> RecordPlan:
    """σ (from ``dp.target_epsilon`` when set, else ``dp.noise_multiplier``), the local steps
    per round and the ``ε`` a client in every round ends with, counting its row count."""
    dp = p.dp
    steps = local_steps(p.local_epochs, dp.sample_rate)
    total = steps * p.rounds
    count = count_release_step(dp)
    if dp.target_epsilon is not None:
        sigma = plan_noise_multiplier(
            dp.target_epsilon, dp.delta, dp.sample_rate, total, dp.accountant, prefix=[count]
        )
    else:
        sigma = dp.noise_multiplier
    epsilon = epsilon_for([count, (sigma, dp.sample_rate, total)], dp.delta, dp.accountant)
    return RecordPlan(sigma, steps, p.rounds, epsilon)


def client_features(
    encoder: torch.nn.Module, table: ImageTable | TableStream, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features float64 (n, d), labels int64 (n,))`` of a client's rows, batch by batch."""
    from pipelines.models.probes import extract_features

    features, labels = [], []
    for images, batch_labels in batches_with_labels(table):
        if len(images):
            features.append(extract_features(encoder, images, device=device))
            labels.append(np.asarray(batch_labels, dtype=np.int64))
    if not features:
        return torch.zeros(0, encoder.embedding_dim, dtype=torch.float64), torch.zeros(
            0, dtype=torch.int64
        )
    return as_float64(np.concatenate(features)), torch.from_numpy(np.concatenate(labels))


@dataclass
class PrivateClient:
    """One client under record-level DP: its fixed features, labels and accountant, which it
    keeps for the whole run."""

    name: str
    features: torch.Tensor
    labels: torch.Tensor
    accountant: ClientAccountant

    def release_row_count(self, dp: DPParams, seed: int) -> float:
        """Its row count plus ``N(0, σ_count²)``, at least 1 (spends one Gaussian step)."""
        return release_noisy_count(
            len(self.labels), dp.count_noise_multiplier, generator_for(seed), self.accountant
        )

    def train_round(
        self, weight: torch.Tensor, bias: torch.Tensor, settings: RecordDPSettings, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's DP-SGD steps from the global head; returns the client's head."""
        if len(self.labels) == 0:
            return weight.clone(), bias.clone()
        head = private_head_training(
            weight, bias, self.features, self.labels, settings, generator_for(seed)
        )
        self.accountant.spend(settings.noise_multiplier, settings.sample_rate, settings.steps)
        return head


class EpsilonCache:
    """``ε`` of accountant histories, computed once per distinct history (clients that took
    part in the same rounds share it)."""

    def __init__(self):
        self._known: dict[tuple, float] = {}

    def __call__(self, accountant: ClientAccountant) -> float:
        key = (accountant.delta, accountant.accountant, tuple(accountant.history))
        if key not in self._known:
            self._known[key] = accountant.epsilon()
        return self._known[key]


class LocalRecordSites:
    """The clients of an in-process run, each a :class:`PrivateClient` holding its own
    accountant; noise streams are seeded from the run's seed (reproducible)."""

    def __init__(self, private: list[PrivateClient], dp: DPParams, seed: int):
        self.private, self.dp, self.seed = private, dp, seed
        self.epsilon_of = EpsilonCache()

    @property
    def names(self) -> list[str]:
        """The clients, in run order."""
        return [c.name for c in self.private]

    def use_projection(self, projection: FeatureProjection) -> None:
        """Map every client's features with the server's public ``projection``."""
        for client in self.private:
            client.features = projection.apply(client.features)

    def release_row_counts(self) -> list[float]:
        """Each client's noisy row count (before the first round)."""
        from pipelines.federated.fedavg import client_seed

        return [
            c.release_row_count(self.dp, client_seed(self.seed, 0, i) + 1)
            for i, c in enumerate(self.private)
        ]

    def train(self, chosen, weight, bias, settings: RecordDPSettings, round_index: int):
        """The heads of the ``chosen`` clients after this round's DP-SGD steps."""
        from pipelines.federated.fedavg import client_seed

        return [
            self.private[i].train_round(
                weight, bias, settings, client_seed(self.seed, round_index, i)
            )
            for i in chosen
        ]

    def epsilons(self) -> list[float]:
        """Each client's ``ε`` so far."""
        return [self.epsilon_of(c.accountant) for c in self.private]

    def accountant_states(self) -> list[dict[str, Any]]:
        """Each client's accountant, JSON-able (what a checkpoint keeps)."""
        return [c.accountant.to_state() for c in self.private]

    def restore_accountants(self, states: list[dict[str, Any]]) -> None:
        """Put back the accountants :meth:`accountant_states` gave (a resumed run)."""
        if len(states) != len(self.private):
            raise ValueError(f"{len(states)} saved accountants for {len(self.private)} clients")
        for client, state in zip(self.private, states, strict=True):
            client.accountant = ClientAccountant.from_state(state)


@dataclass
class RecordRun:
    """What a record-level run ends with: the released head (the moving average over
    rounds, float64, on the encoder's features), one history row per round and what each
    client released."""

    weight: torch.Tensor
    bias: torch.Tensor
    history: list[dict[str, float]]
    released: list[dict]


def log_record_plan(plan: RecordPlan, dp: DPParams) -> None:
    """One log line with the run's noise, steps and worst-case ``ε``."""
    log.info(
        "record-level DP: noise multiplier %.4g, %d DP-SGD steps per round at sample rate "
        "%g, clip %g; a client in every round ends at epsilon %.4g (delta %g, %s)",
        plan.noise_multiplier,
        plan.steps_per_round,
        dp.sample_rate,
        dp.clip_norm,
        plan.epsilon,
        dp.delta,
        dp.accountant,
    )


def record_settings(p: FederateParams, plan: RecordPlan) -> RecordDPSettings:
    """The DP-SGD settings every client uses each round."""
    dp = p.dp
    return RecordDPSettings(
        dp.clip_norm, plan.noise_multiplier, dp.sample_rate, plan.steps_per_round, p.learning_rate
    )


def run_record_rounds(
    sites,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    p: FederateParams,
    seed: int,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: Checkpoint | None = None,
) -> RecordRun:
    """The server's side of a record-level run, whatever holds the clients.

    ``sites`` has ``names``, ``use_projection(projection)``, ``release_row_counts()``,
    ``train(chosen, weight, bias, settings, round)`` → heads and ``epsilons()``
    (:class:`LocalRecordSites` in process, the Flower ServerApp's sites on Flower). First
    the feature map is fitted on ``val_features`` (server-held) and handed to the sites.
    Each round: sample clients, average their heads (weights: the noisy counts), apply with
    ``server_learning_rate``, update the moving average and score it on val. The returned
    head is folded back onto the encoder's features.

    With a ``checkpoint`` (in process: ``sites`` must also have ``accountant_states()`` and
    ``restore_accountants(states)``), every round ends by saving the heads, the sampling
    generator, the history, the noisy row counts and every client's accountant; a run that
    finds one resumes after its round without releasing anything twice: the row counts are
    not drawn again and each accountant goes on from what it had spent. The result and the
    ``ε`` are the same, bit for bit, as a run that was never interrupted.
    """
    from pipelines.federated.fedavg import sample_clients

    dp = p.dp
    plan = plan_record_run(p)
    log_record_plan(plan, dp)
    settings = record_settings(p, plan)
    projection = fit_feature_projection(val_features, dp.feature_components)
    log.info(
        "features centred on %d server-held val rows%s",
        len(val_labels),
        f", projected onto {projection.dim} principal directions"
        if projection.basis is not None
        else "",
    )
    sites.use_projection(projection)
    val_features = projection.apply(val_features)
    dim = projection.dim
    weight = torch.zeros(num_classes, dim, dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    average_w, average_b = weight.clone(), bias.clone()
    rng = np.random.default_rng(seed)
    history: list[dict[str, float]] = []
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        released_rows = sites.release_row_counts()
    else:
        tensors, meta = saved
        weight, bias = tensors["weight"], tensors["bias"]
        average_w, average_b = tensors["average_weight"], tensors["average_bias"]
        rng.bit_generator.state = meta["rng"]
        history = list(meta["history"])
        released_rows = [float(rows) for rows in meta["released_rows"]]
        sites.restore_accountants(meta["accountants"])
        log.info("resuming after round %d of %d (%s)", len(history), p.rounds, checkpoint.path)
        for row in history:
            if on_round is not None:
                on_round(int(row["round"]), row)
    for round_index in range(len(history) + 1, p.rounds + 1):
        chosen = sample_clients(len(released_rows), p.client_fraction, rng)
        heads = sites.train(chosen, weight, bias, settings, round_index)
        shares = torch.tensor([released_rows[i] for i in chosen], dtype=torch.float64)
        shares = shares / shares.sum()
        mean_w = sum(s * h[0] for s, h in zip(shares, heads, strict=True))
        mean_b = sum(s * h[1] for s, h in zip(shares, heads, strict=True))
        weight = weight + p.server_learning_rate * (mean_w - weight)
        bias = bias + p.server_learning_rate * (mean_b - bias)
        if round_index == 1:
            average_w, average_b = weight.clone(), bias.clone()
        else:
            decay = dp.average_decay
            average_w = decay * average_w + (1 - decay) * weight
            average_b = decay * average_b + (1 - decay) * bias
        predicted = (val_features @ average_w.T + average_b).argmax(1)
        row = {
            "round": round_index,
            "val_accuracy": float((predicted == val_labels).double().mean()),
            "train_loss": math.nan,
            "clients": len(chosen),
            "accepted": len(chosen),
            "rejected": 0,
            "dropped": 0,
            "samples": int(sum(released_rows[i] for i in chosen) * p.local_epochs),
            "epsilon": max(sites.epsilons()),
        }
        history.append(row)
        if checkpoint is not None:
            checkpoint.save(
                {
                    "weight": weight,
                    "bias": bias,
                    "average_weight": average_w,
                    "average_bias": average_b,
                },
                {
                    "round": round_index,
                    "rng": rng.bit_generator.state,
                    "history": history,
                    "released_rows": released_rows,
                    "accountants": sites.accountant_states(),
                },
            )
        if on_round is not None:
            on_round(round_index, row)
    released = [
        {"site": name, "rows_released": rows, "epsilon": epsilon}
        for name, rows, epsilon in zip(sites.names, released_rows, sites.epsilons(), strict=True)
    ]
    return RecordRun(*projection.fold(average_w, average_b), history, released)


def classifier_with_head(encoder: torch.nn.Module, run: RecordRun, seed: int):
    """The released classifier: ``encoder`` + the run's head (CPU, eval mode)."""
    from pipelines.federated.fedavg import start_classifier

    model = start_classifier(encoder, int(run.weight.shape[0]), seed)
    model.head.weight.data.copy_(run.weight.float())
    model.head.bias.data.copy_(run.bias.float())
    return model.eval()


def val_features_and_labels(encoder: torch.nn.Module, val: ImageTable, device: str = "cpu"):
    """``(features float64, labels int64)`` of the val table under ``encoder``."""
    features = client_features(encoder, val, device)[0]
    return features, torch.from_numpy(np.array(val.labels, dtype=np.int64))


def run_record_federation(
    encoder: torch.nn.Module,
    clients: list[ImageTable | TableStream],
    names: list[str],
    val: ImageTable,
    p: FederateParams,
    seed: int,
    device: str = "cpu",
    on_round: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: Checkpoint | None = None,
):
    """FedAvg of DP-SGD linear heads on ``encoder``'s fixed features, in process; with a
    ``checkpoint`` each round is saved and a saved run resumes (:func:`run_record_rounds`).

    Returns ``(model, history, released)``: the classifier (``encoder`` + the averaged head,
    CPU, eval mode), one row per round (``round``, ``val_accuracy``, ``train_loss`` = NaN
    (not released), ``clients``, ``accepted``, ``rejected``, ``dropped``, ``samples``,
    ``epsilon`` = the largest client ε so far) and per client what it released:
    ``{"site", "rows_released", "epsilon"}``.
    """
    from pipelines.models.devices import resolve_accelerator

    device = resolve_accelerator(device)
    private = [
        PrivateClient(
            name,
            *client_features(encoder, table, device),
            ClientAccountant(p.dp.delta, p.dp.accountant),
        )
        for name, table in zip(names, clients, strict=True)
    ]
    val_features, val_labels = val_features_and_labels(encoder, val, device)
    run = run_record_rounds(
        LocalRecordSites(private, p.dp, seed),
        val_features,
        val_labels,
        int(val.num_classes),
        p,
        seed,
        on_round,
        checkpoint,
    )
    return classifier_with_head(encoder, run, seed), run.history, run.released
