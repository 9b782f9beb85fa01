"""Server side of a round: screening, aggregators, server optimizers, DP accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.federated.privacy import (
    PrivacyBudgetError,
    check_budget,
    clip_update,
    epsilon_after,
    private_mean,
    rounds_within,
)
from pipelines.federated.strategies import (
    ServerOptimizer,
    apply_update,
    coordinate_median,
    flatten_update,
    krum,
    min_updates_for,
    screen_updates,
    trimmed_mean,
    weighted_mean,
)


def test_flatten_and_apply_round_trip_keep_integer_buffers():
    global_state = {
        "w": torch.zeros(2, 3),
        "b": torch.ones(3, dtype=torch.float16),
        "n": torch.tensor(7),
    }
    client = {"w": torch.full((2, 3), 0.5), "b": torch.full((3,), 2.0).half(), "n": torch.tensor(9)}
    update = flatten_update(client, global_state)
    assert update.dtype == torch.float64 and update.shape == (9,)
    assert update.tolist() == [0.5] * 6 + [1.0] * 3
    new = apply_update(global_state, update)
    assert torch.equal(new["w"], client["w"]) and torch.equal(new["b"], client["b"])
    assert int(new["n"]) == 7 and new["b"].dtype == torch.float16
    with pytest.raises(ValueError, match="update has 2 values"):
        apply_update(global_state, torch.zeros(2, dtype=torch.float64))


def test_screen_rejects_non_finite_and_too_large_updates_naming_the_client():
    updates = [
        torch.tensor([1.0, 0.0]),
        torch.tensor([float("nan"), 1.0]),
        torch.tensor([30.0, 40.0]),
        torch.tensor([float("inf"), float("-inf")]),
    ]
    accepted, rejected = screen_updates([3, 5, 7, 9], updates, max_update_norm=10.0)
    assert accepted == [0]
    reasons = {r.client: r.reason for r in rejected}
    assert reasons[5] == "1 non-finite values"
    assert reasons[7] == "update norm 50 above the bound 10"
    assert reasons[9] == "2 non-finite values"
    assert screen_updates([1, 2], updates[:1] + updates[2:3], None)[0] == [0, 1]


def test_aggregators_against_hand_computed_values():
    updates = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -100.0]])
    weights = torch.tensor([1.0, 1.0, 2.0, 0.0])
    assert weighted_mean(updates, weights).tolist() == [2.25, 22.5]
    assert coordinate_median(updates, weights).tolist() == [2.5, 15.0]
    # trim 25% of 4 = 1 value each end per coordinate
    assert trimmed_mean(updates, weights, trim_fraction=0.25).tolist() == [2.5, 15.0]
    assert trimmed_mean(updates, weights, trim_fraction=0.0).tolist() == [26.5, -10.0]
    with pytest.raises(ValueError, match="leaves none"):
        trimmed_mean(updates[:2], weights[:2], trim_fraction=0.49 + 0.01)


def test_krum_picks_the_update_closest_to_its_neighbours_and_ignores_outliers():
    rng = np.random.default_rng(0)
    honest = torch.as_tensor(rng.normal(1.0, 0.1, (8, 5)))
    attackers = torch.as_tensor(rng.normal(-50.0, 0.1, (2, 5)))
    updates = torch.cat([honest, attackers])
    chosen = krum(updates, torch.ones(10), byzantine_clients=2, krum_selected=1)
    assert any(torch.equal(chosen, row) for row in honest)
    multi = krum(updates, torch.ones(10), byzantine_clients=2, krum_selected=4)
    assert float((multi - 1.0).abs().max()) < 0.3
    with pytest.raises(ValueError, match="at least f \\+ 3"):
        krum(updates[:4], torch.ones(4), byzantine_clients=2)
    assert min_updates_for("krum", 0.1, 2) == 5
    assert min_updates_for("trimmed_mean", 0.3, 0) == 1
    assert min_updates_for("mean", 0.1, 5) == 1


@pytest.mark.parametrize("aggregator", [coordinate_median, trimmed_mean, krum])
def test_robust_aggregators_resist_two_sign_flipping_clients_where_the_mean_does_not(aggregator):
    rng = np.random.default_rng(1)
    truth = torch.as_tensor(rng.normal(0, 1, 20))
    honest = truth + torch.as_tensor(rng.normal(0, 0.05, (8, 20)))
    attack = -10.0 * truth.repeat(2, 1)  # sign flip, scaled up
    updates = torch.cat([honest, attack])
    kwargs = {"trim_fraction": 0.2, "byzantine_clients": 2, "krum_selected": 3}
    robust_error = float((aggregator(updates, torch.ones(10), **kwargs) - truth).norm())
    mean_error = float((weighted_mean(updates, torch.ones(10)) - truth).norm())
    assert robust_error < 0.1 * truth.norm()
    assert mean_error > truth.norm()  # the attack is real: it flips the plain mean


def test_server_sgd_and_fedadam_steps():
    assert ServerOptimizer("sgd", learning_rate=0.5).step(torch.tensor([2.0])).tolist() == [1.0]
    adam = ServerOptimizer("adam", learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    delta = torch.tensor([1.0, -2.0], dtype=torch.float64)
    first = adam.step(delta)
    # m = 0.1 * (-delta), v = 0.01 * delta^2: step = -lr * m / (sqrt(v) + tau)
    expected = -0.1 * (0.1 * -delta) / ((0.01 * delta**2).sqrt() + 1e-3)
    assert torch.allclose(first, expected)
    assert torch.sign(first).tolist() == [1.0, -1.0]  # moves along the aggregate
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("rmsprop").step(delta)


def test_opacus_rdp_accountant_golden_case():
    # Opacus's own reference value for these settings
    assert epsilon_after(2250, 1.5, 0.04, 1e-5) == pytest.approx(7.3291, abs=1e-3)
    assert epsilon_after(0, 1.5, 0.04, 1e-5) == 0.0


def test_rounds_within_a_target_is_the_last_round_below_it():
    rounds = rounds_within(8.0, 500, 1.0, 0.1, 1e-5)
    assert 0 < rounds < 500
    assert epsilon_after(rounds, 1.0, 0.1, 1e-5) <= 8.0 < epsilon_after(rounds + 1, 1.0, 0.1, 1e-5)
    assert rounds_within(1.0, 500, 1.0, 0.1, 1e-5) == 0  # even one round costs more
    assert rounds_within(1e6, 50, 1.0, 0.1, 1e-5) == 50


def test_private_mean_clips_then_adds_calibrated_noise():
    assert clip_update(torch.tensor([3.0, 4.0]), 1.0).tolist() == pytest.approx([0.6, 0.8])
    assert clip_update(torch.tensor([0.3, 0.4]), 1.0).tolist() == pytest.approx([0.3, 0.4])
    updates = [torch.full((20000,), 10.0, dtype=torch.float64) for _ in range(4)]
    noisy = private_mean(
        updates,
        clip_norm=2.0,
        noise_multiplier=1.5,
        expected_clients=4,
        generator=torch.Generator().manual_seed(0),
    )
    clipped_sum = torch.full((20000,), 4 * 2.0 / math.sqrt(20000), dtype=torch.float64)
    noise = noisy * 4 - clipped_sum  # what was added to the sum of clipped updates
    replay = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(noise, replay * 1.5 * 2.0)  # N(0, (sigma * C)^2), seeded
    assert float(noise.std()) == pytest.approx(3.0, rel=0.03)


def test_budget_check_refuses_runs_past_the_ledger_and_runs_without_dp():
    check_budget(spent=3.0, planned=4.0, max_epsilon=8.0, data="abc")
    check_budget(spent=100.0, planned=math.inf, max_epsilon=None, data="abc")
    with pytest.raises(PrivacyBudgetError, match="3 spent \\+ 6 planned > privacy.max_epsilon 8"):
        check_budget(spent=3.0, planned=6.0, max_epsilon=8.0, data="abcdef")
    with pytest.raises(PrivacyBudgetError, match="dp is off"):
        check_budget(spent=0.0, planned=math.inf, max_epsilon=8.0, data="abc")
