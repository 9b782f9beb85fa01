"""Client sampling, round learning rates, local epochs on small shards and the class-mean
head (the aggregation of updates is tested in test_strategies.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.config import FederateParams
from pipelines.federated.fedavg import (
    FINAL_LR_FRACTION,
    class_mean_head,
    init_head_from_class_means,
    local_epochs_for,
    round_learning_rate,
    sample_clients,
)


def test_sample_clients_fraction_distinct_and_seeded() -> None:
    chosen = sample_clients(10, 0.3, np.random.default_rng(0))
    assert len(chosen) == 3 and len(set(chosen)) == 3 and chosen == sorted(chosen)
    assert chosen == sample_clients(10, 0.3, np.random.default_rng(0))
    assert sample_clients(10, 0.01, np.random.default_rng(0)).__len__() == 1
    assert sample_clients(5, 1.0, np.random.default_rng(0)) == [0, 1, 2, 3, 4]


def test_small_shards_train_enough_steps() -> None:
    p = FederateParams(local_epochs=2, batch_size=16, min_local_steps=20)
    assert local_epochs_for(320, p) == 2  # 20 batches an epoch: two epochs are plenty
    assert local_epochs_for(160, p) == 2  # 10 batches x 2 = 20 steps
    assert local_epochs_for(150, p) == 2  # 10 batches (the last one short)
    assert local_epochs_for(25, p) == 10  # 2 batches an epoch: 10 epochs for 20 steps
    assert local_epochs_for(1, p) == 20
    # 0 keeps local_epochs whatever the shard
    assert local_epochs_for(25, p.model_copy(update={"min_local_steps": 0})) == 2


def test_round_learning_rate_decays_from_full_to_floor() -> None:
    p = FederateParams(rounds=10, learning_rate=0.01)
    rates = [round_learning_rate(p, r) for r in range(1, 11)]
    assert rates[0] == pytest.approx(0.01)
    assert rates[-1] == pytest.approx(0.01 * FINAL_LR_FRACTION)
    assert all(x > y for x, y in zip(rates, rates[1:], strict=False))
    assert round_learning_rate(FederateParams(rounds=1, learning_rate=0.01), 1) == 0.01


def test_class_mean_head_by_hand() -> None:
    # two clients, 3 classes in 2-d; class 2 held by nobody; mean embedding norm 12 / 3 = 4
    first = {
        "sums": torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
        "counts": torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64),
        "norm_sum": torch.tensor(8.0, dtype=torch.float64),
    }
    second = {
        "sums": torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64),
        "counts": torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),
        "norm_sum": torch.tensor(4.0, dtype=torch.float64),
    }
    weight, bias, present = class_mean_head([first, second], scale=4.0)
    assert present.tolist() == [True, True, False]
    # class means (1, 0) and (0, 1), centre (0.5, 0.5): directions ±(1, -1)/sqrt(2)
    half = 0.5**0.5
    torch.testing.assert_close(weight[0], torch.tensor([half, -half]))  # * 4 / 4
    torch.testing.assert_close(weight[1], torch.tensor([-half, half]))
    torch.testing.assert_close(bias[:2], torch.zeros(2))  # the centre is orthogonal to both
    assert torch.equal(weight[2], torch.zeros(2)) and bias[2] == 0
    # a unit embedding at class 0's mean scores scale * |m_0 - g| = 4 * sqrt(0.5) for class 0
    logits = weight @ torch.tensor([4.0, 0.0]) + bias
    assert logits[0].item() == pytest.approx(4 * half) and logits[1] < 0


def test_head_from_class_means_classifies_separable_clients() -> None:
    from pipelines.io import ImageTable
    from pipelines.models.encoder import Classifier, Encoder
    from pipelines.models.probes import predict_logits

    # class 0 bright top half, class 1 bright bottom half; each client holds one class
    rng = np.random.default_rng(0)
    images = rng.random((40, 6, 6), dtype=np.float32) * 0.2
    labels = np.repeat([0, 1], 20)
    images[:20, :3] += 0.8
    images[20:, 3:] += 0.8
    table = ImageTable(images.clip(0, 1), labels, 2)
    torch.manual_seed(0)
    model = Classifier(Encoder(embedding_dim=16), 2)
    clients = [table.subset(np.arange(20)), table.subset(np.arange(20, 40))]
    state = init_head_from_class_means(model.config, model.state_dict(), clients, "cpu")
    assert not torch.equal(state["head.weight"], model.state_dict()["head.weight"])
    assert torch.equal(state["encoder.fc.weight"], model.state_dict()["encoder.fc.weight"])
    model.load_state_dict(state)
    assert (predict_logits(model, images).argmax(1) == labels).mean() == 1.0


def test_client_step_on_random_views_with_extra_epochs_learns() -> None:
    """The default client step of params.yaml: random views (``augment``) and extra epochs
    on a shard too small for ``min_local_steps`` (here 2 batches an epoch → 8 epochs)."""
    from pipelines.federated.fedavg import evaluate_accuracy, train_client
    from pipelines.io import ImageTable
    from pipelines.models.encoder import Classifier, Encoder

    rng = np.random.default_rng(1)
    images = rng.random((32, 8, 8), dtype=np.float32) * 0.2
    labels = np.repeat([0, 1], 16)
    images[:16, :, :4] += 0.8  # class 0: bright left half
    images[16:, :, 4:] += 0.8  # class 1: bright right half
    table = ImageTable(images.clip(0, 1), labels, 2)
    torch.manual_seed(0)
    model = Classifier(Encoder(embedding_dim=16), 2)
    chance = evaluate_accuracy(model.eval(), table, "cpu")
    p = FederateParams(
        local_epochs=1, batch_size=16, learning_rate=0.01, augment=True, min_local_steps=16
    )
    assert local_epochs_for(32, p) == 8
    state, rows, loss = train_client(
        model.state_dict(), table, p, 0, "cpu", model_config=model.config
    )
    model.load_state_dict(state)
    assert rows == 32 and np.isfinite(loss)
    assert evaluate_accuracy(model.eval(), table, "cpu") == 1.0 > chance
