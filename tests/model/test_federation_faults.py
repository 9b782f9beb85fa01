"""Federated rounds with faulty clients, on the bundled digits: NaN updates, crashes,
too few survivors, attackers, FedProx / FedAdam, and DP with its ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.config import DPParams, FederateParams
from pipelines.federated.fedavg import FederationError, run_federation, train_client
from pipelines.io import ImageTable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def make_setup():
    """Digits: val, K=10 IID clients, and a start model already federated for 4 clean rounds
    (a random encoder's first rounds swing too much to compare runs point by point); the
    tests then fine-tune it for 2 rounds."""
    from sklearn.datasets import load_digits

    from pipelines.federated.fedavg import init_head_from_class_means
    from pipelines.models.encoder import Classifier, Encoder

    data = load_digits()
    table = ImageTable((data.images / 16.0).astype(np.float32), data.target.astype(np.int64), 10)
    order = np.random.default_rng(0).permutation(len(table))
    val, pool = table.subset(order[:300]), table.subset(order[300:])
    clients = [pool.subset(rows) for rows in np.array_split(np.arange(len(pool)), 10)]
    torch.manual_seed(0)
    model = Classifier(Encoder(embedding_dim=32), 10)
    state = init_head_from_class_means(model.config, model.state_dict(), clients, "cpu")
    warm = FederateParams(rounds=6, local_epochs=1, batch_size=32, learning_rate=0.002)
    warmed, _ = run_federation(model.config, state, clients, val, warm, 0, "cpu")
    return {"val": val, "clients": clients, "config": model.config, "state": warmed.state_dict()}


def federate(setup, trainer=train_client, **overrides):
    params = FederateParams(
        **{"rounds": 2, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.0005, **overrides}
    )
    return run_federation(
        setup["config"],
        setup["state"],
        setup["clients"],
        setup["val"],
        params,
        0,
        "cpu",
        trainer=trainer,
    )


def corrupting(setup, bad_clients: dict[int, str]):
    """A trainer that trains honestly, then corrupts the listed clients' states."""
    index_of = {id(table): i for i, table in enumerate(setup["clients"])}

    def trainer(state, table, params, seed, device, *, model_config):
        new_state, size, loss = train_client(
            state, table, params, seed, device, model_config=model_config
        )
        kind = bad_clients.get(index_of[id(table)])
        if kind == "nan":
            new_state = {
                k: v.float() * math.nan if v.is_floating_point() else v
                for k, v in new_state.items()
            }
        elif kind == "crash":
            raise RuntimeError("site went offline")
        elif kind == "noise":
            generator = torch.Generator().manual_seed(seed)
            new_state = {
                k: v + 0.5 * torch.randn(v.shape, generator=generator)
                if v.is_floating_point()
                else v
                for k, v in new_state.items()
            }
        elif kind == "scale":
            new_state = {
                k: (state[k] + 10.0 * (v - state[k])) if v.is_floating_point() else v
                for k, v in new_state.items()
            }
        elif kind == "sign_flip":
            new_state = {
                k: (state[k] - 10.0 * (v - state[k])) if v.is_floating_point() else v
                for k, v in new_state.items()
            }
        return new_state, size, loss

    return trainer


@pytest.fixture(scope="module")
def clean(setup):
    model, history = federate(setup)
    return history


def test_a_nan_client_is_rejected_and_the_model_stays_finite(setup, clean):
    model, history = federate(setup, corrupting(setup, {2: "nan"}))
    assert [row["rejected"] for row in history] == [1, 1]
    assert all(
        torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point()
    )
    # nine honest clients of ten: within a point of the clean run
    assert history[-1]["val_accuracy"] >= clean[-1]["val_accuracy"] - 0.01


def test_a_crashing_client_is_dropped_and_the_round_completes(setup, clean):
    _, history = federate(setup, corrupting(setup, {0: "crash"}))
    assert [row["dropped"] for row in history] == [1, 1]
    assert [row["accepted"] for row in history] == [9, 9]


def test_too_few_survivors_fail_the_round_cleanly(setup):
    with pytest.raises(FederationError, match="round 1: 8 acceptable client updates, 9 needed"):
        federate(setup, corrupting(setup, {0: "crash", 1: "nan"}), min_clients=9)


ATTACKS = {
    "sign_flip": {9: "sign_flip"},
    "scale": {8: "scale", 9: "scale"},
    "noise": {8: "noise", 9: "noise"},
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_plain_fedavg_is_hurt_by_the_attack(setup, clean, attack):
    _, plain = federate(setup, corrupting(setup, ATTACKS[attack]))
    assert plain[-1]["val_accuracy"] < clean[-1]["val_accuracy"] - 0.05  # the attack is real


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "krum"])
def test_robust_aggregators_stay_within_two_points_of_clean(setup, clean, aggregator, attack):
    bad = ATTACKS[attack]
    _, robust = federate(
        setup,
        corrupting(setup, bad),
        aggregator=aggregator,
        trim_fraction=0.2,
        byzantine_clients=len(bad),
    )
    assert robust[-1]["val_accuracy"] >= clean[-1]["val_accuracy"] - 0.02


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "fedprox", "proximal_mu": 0.1},
        {"strategy": "fedadam", "server_learning_rate": 0.01},
    ],
)
def test_fedprox_and_fedadam_learn(setup, overrides):
    _, history = federate(setup, **overrides)
    assert history[-1]["val_accuracy"] > 0.6  # chance is 0.1


def test_dp_rounds_report_growing_epsilon_and_stop_at_the_target(setup):
    dp = DPParams(enabled=True, clip_norm=1.0, noise_multiplier=1.0, target_epsilon=None)
    _, history = federate(setup, rounds=3, dp=dp)
    epsilons = [row["epsilon"] for row in history]
    assert len(history) == 3 and epsilons == sorted(epsilons) and epsilons[0] > 0
    capped = dp.model_copy(update={"target_epsilon": (epsilons[1] + epsilons[2]) / 2})
    _, stopped = federate(setup, rounds=3, dp=capped)
    assert len(stopped) == 2 and stopped[-1]["epsilon"] <= capped.target_epsilon
