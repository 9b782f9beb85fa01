"""A fit interrupted after any epoch or round resumes from its checkpoint to the same
weights, bit for bit on the CPU (pipelines/checkpoints.py, pipelines/models/resume.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.checkpoints import Checkpoint
from pipelines.config import FederateParams, PretrainParams
from pipelines.io import ImageTable

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


class Interrupted(Exception):
    """Stands in for a kill: raised from a progress hook, after the checkpoint of that
    epoch or round (federate) or before it (pretrain: the hook runs first)."""


def stop_at(unit: int):
    """A progress hook (``(epoch or round, loss or row)``) that stands in for a kill at
    epoch or round ``unit``."""

    def hook(index, _):
        if index == unit:
            raise Interrupted

    return hook


def digits(rows: int, start: int = 0) -> ImageTable:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images[start : start + rows] / 16.0).astype(np.float32)
    return ImageTable(images, data.target[start : start + rows].astype(np.int64), 10)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_round_trips_tensors_and_meta(tmp_path):
    checkpoint = Checkpoint(tmp_path / "c.safetensors")
    assert checkpoint.load() is None
    checkpoint.save({"w": torch.arange(4.0)}, {"round": 3, "history": [{"a": 1.5}]})
    tensors, meta = checkpoint.load()
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta["history"] == [{"a": 1.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left
    checkpoint.clear()
    assert checkpoint.load() is None


def test_split_and_join_tensors_restore_an_optimizer_state():
    from pipelines.models.resume import join_tensors, split_tensors

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    tensors: dict = {}
    rest = split_tensors(optimizer.state_dict(), "optimizer", tensors)
    import json

    restored = join_tensors(json.loads(json.dumps(rest)), tensors)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(restored)
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"]
    )


def test_pretrain_resumes_after_an_interrupted_epoch_to_the_same_encoder(tmp_path):
    from pipelines.stages.pretrain import pretrain

    pool = digits(256)
    p = PretrainParams(epochs=5, batch_size=64, warmup_epochs=2, embedding_dim=16)
    reference, losses = pretrain(pool, p, seed=3, device="cpu")

    checkpoint = Checkpoint(tmp_path / "pretrain.safetensors")

    with pytest.raises(Interrupted):
        pretrain(pool, p, seed=3, device="cpu", on_epoch=stop_at(4), checkpoint=checkpoint)
    assert checkpoint.load()[1]["epoch"] == 3  # the hook runs before the epoch's save
    seen = []
    resumed, resumed_losses = pretrain(
        pool, p, seed=3, device="cpu", on_epoch=lambda e, _: seen.append(e), checkpoint=checkpoint
    )
    assert seen == [4, 5]  # only the epochs left
    assert resumed_losses == losses
    assert states_equal(resumed.state_dict(), reference.state_dict())


def test_federation_resumes_after_an_interrupted_round_to_the_same_model(tmp_path):
    from pipelines.federated.fedavg import run_federation
    from pipelines.models.encoder import build_classifier, classifier_config, encoder_config

    clients = [digits(60, 0), digits(60, 60), digits(60, 120)]
    val = digits(100, 400)
    config = classifier_config(encoder_config(16, (8, 16), groups=4), 10)
    torch.manual_seed(0)
    start = build_classifier(config).state_dict()
    p = FederateParams(
        rounds=4,
        local_epochs=1,
        client_fraction=0.67,
        strategy="fedadam",
        server_learning_rate=0.05,
    )
    reference, history = run_federation(config, start, clients, val, p, seed=5, device="cpu")

    checkpoint = Checkpoint(tmp_path / "federate.safetensors")

    with pytest.raises(Interrupted):
        run_federation(
            config,
            start,
            clients,
            val,
            p,
            seed=5,
            device="cpu",
            on_round=stop_at(2),
            checkpoint=checkpoint,
        )
    assert checkpoint.load()[1]["round"] == 2
    model, resumed_history = run_federation(
        config, start, clients, val, p, seed=5, device="cpu", checkpoint=checkpoint
    )
    assert resumed_history == history
    assert states_equal(model.state_dict(), reference.state_dict())


def test_record_level_federation_resumes_with_its_accountants(tmp_path):
    """Under record-level DP the checkpoint also holds every client's accountant and noisy
    row count: the resumed run releases nothing twice and ends at the same ε and head."""
    from pipelines.federated.record_federation import run_record_federation
    from pipelines.models.encoder import build_encoder, encoder_config

    torch.manual_seed(0)
    encoder = build_encoder(encoder_config(16, (8, 16), groups=4)).eval()
    clients = [digits(80, 0), digits(80, 80), digits(80, 160)]
    names = ["a", "b", "c"]
    val = digits(100, 400)
    p = FederateParams(
        rounds=4,
        local_epochs=1,
        client_fraction=0.67,
        dp={"enabled": True, "unit": "record", "noise_multiplier": 1.5, "sample_rate": 0.25},
    )
    reference, history, released = run_record_federation(
        encoder, clients, names, val, p, seed=9, device="cpu"
    )

    checkpoint = Checkpoint(tmp_path / "federate.safetensors")

    with pytest.raises(Interrupted):
        run_record_federation(
            encoder, clients, names, val, p, 9, "cpu", stop_at(2), checkpoint=checkpoint
        )
    saved = checkpoint.load()[1]
    assert saved["round"] == 2 and len(saved["accountants"]) == 3
    seen = []
    model, resumed_history, resumed_released = run_record_federation(
        encoder, clients, names, val, p, 9, "cpu", lambda r, _: seen.append(r), checkpoint
    )
    assert seen == [1, 2, 3, 4]  # the saved rounds are reported again, then 3 and 4 run
    assert resumed_released == released  # same noisy counts, same ε: nothing spent twice
    assert np.array_equal(
        np.array([row["val_accuracy"] for row in resumed_history]),
        np.array([row["val_accuracy"] for row in history]),
    )
    assert [row["epsilon"] for row in resumed_history] == [row["epsilon"] for row in history]
    assert states_equal(model.state_dict(), reference.state_dict())


def test_federated_pretraining_resumes_after_an_interrupted_round(tmp_path):
    from pipelines.federated.ssl import pretrain_federated

    clients = [digits(64, 0), digits(64, 64)]
    p = PretrainParams(
        mode="federated", rounds=3, local_epochs=1, client_batch_size=32, embedding_dim=16
    )
    reference, losses = pretrain_federated(clients, p, seed=4, device="cpu")

    checkpoint = Checkpoint(tmp_path / "pretrain.safetensors")

    with pytest.raises(Interrupted):
        pretrain_federated(clients, p, 4, "cpu", stop_at(2), checkpoint)
    assert checkpoint.load()[1]["round"] == 2
    resumed, resumed_losses = pretrain_federated(clients, p, 4, "cpu", checkpoint=checkpoint)
    assert resumed_losses == losses
    assert states_equal(resumed.state_dict(), reference.state_dict())


def test_pretraining_on_a_streamed_pool_resumes_to_the_same_encoder(tmp_path):
    """A pool over ``common.memory_budget_mb`` is read from disk each epoch; a resumed fit
    streams the epochs left in the order an uninterrupted one would."""
    from pipelines.io import TableStream, write_image_table
    from pipelines.stages.pretrain import pretrain

    write_image_table(digits(200), tmp_path / "pool.parquet")
    stream = TableStream.from_file(tmp_path / "pool.parquet", batch_rows=48)
    p = PretrainParams(epochs=4, batch_size=32, warmup_epochs=1, embedding_dim=16)
    reference, losses = pretrain(stream, p, seed=6, device="cpu")

    checkpoint = Checkpoint(tmp_path / "pretrain.safetensors")

    with pytest.raises(Interrupted):
        pretrain(stream, p, 6, "cpu", on_epoch=stop_at(3), checkpoint=checkpoint)
    assert checkpoint.load()[1]["epoch"] == 2
    resumed, resumed_losses = pretrain(stream, p, 6, "cpu", checkpoint=checkpoint)
    assert resumed_losses == losses
    assert states_equal(resumed.state_dict(), reference.state_dict())
