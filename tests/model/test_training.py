"""Real training on the bundled digits: SimCLR learns, FedAvg learns, weights round-trip.

Also runs the pretrain and federate stages' ``run`` on partitions written in the data
contract, with a recording tracker in place of MLflow.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import CommonParams, FederateParams, Params, PretrainParams
from pipelines.io import ImageTable, Paths, read_json, write_image_table, write_json


@pytest.fixture(scope="module")
def digits() -> dict[str, ImageTable]:
    """Digits split into a train pool, val and three IID client shards of the pool."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)
    table = ImageTable(images, data.target.astype(np.int64), 10)
    order = np.random.default_rng(0).permutation(len(table))
    val, pool = table.subset(order[:300]), table.subset(order[300:])
    shards = np.array_split(np.arange(len(pool)), 3)
    return {
        "val": val,
        "pool": pool,
        **{f"client_{k:03d}": pool.subset(rows) for k, rows in enumerate(shards)},
    }


def clients_of(digits: dict[str, ImageTable]) -> list[ImageTable]:
    return [table for name, table in sorted(digits.items()) if name.startswith("client_")]


def test_simclr_loss_falls_and_knn_beats_chance(digits) -> None:
    from pipelines.models.probes import extract_features, knn_accuracy
    from pipelines.stages.pretrain import pretrain

    p = PretrainParams(epochs=4, batch_size=256, embedding_dim=64, projection_dim=32)
    seen: list[tuple[int, float]] = []
    encoder, losses = pretrain(
        digits["pool"], p, seed=0, device="cpu", on_epoch=lambda *a: seen.append(a)
    )
    assert len(losses) == 4 and [e for e, _ in seen] == [1, 2, 3, 4]
    assert losses[-1] < losses[0] - 0.3, losses
    pool, val = digits["pool"], digits["val"]
    accuracy = knn_accuracy(
        extract_features(encoder, pool.images),
        pool.labels,
        extract_features(encoder, val.images),
        val.labels,
        k=10,
    )
    assert accuracy > 0.6, accuracy  # chance is 0.1


def test_fedavg_from_random_encoder_learns(digits) -> None:
    from pipelines.models.encoder import Encoder
    from pipelines.stages.federate import federate

    torch.manual_seed(0)
    p = FederateParams(rounds=2, local_epochs=1, batch_size=32, learning_rate=0.002)
    rounds: list[int] = []
    model, history = federate(
        Encoder(embedding_dim=64),
        clients_of(digits),
        digits["val"],
        p,
        seed=0,
        device="cpu",
        on_round=lambda r, row: rounds.append(r),
    )
    assert rounds == [1, 2] and [row["round"] for row in history] == [1, 2]
    assert history[-1]["val_accuracy"] > 0.6
    assert history[-1]["samples"] == len(digits["pool"])
    assert not model.training


def test_client_training_is_seeded(digits) -> None:
    from pipelines.federated.fedavg import train_client
    from pipelines.models.encoder import Classifier, Encoder

    torch.manual_seed(0)
    model = Classifier(Encoder(embedding_dim=32), 10)
    p = FederateParams(local_epochs=1, batch_size=64)
    client = digits["client_000"]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    a, n, loss = train_client(start, client, p, 5, "cpu", model_config=model.config)
    # another client in between: the reused module must carry nothing over
    other, _, _ = train_client(a, digits["client_001"], p, 6, "cpu", model_config=model.config)
    b, _, _ = train_client(start, client, p, 5, "cpu", model_config=model.config)
    assert n == len(client) and np.isfinite(loss)
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(start[key], model.state_dict()[key]), key  # input not trained in place
    assert not torch.equal(a["head.weight"], model.state_dict()["head.weight"])
    assert not torch.equal(other["head.weight"], a["head.weight"])


def test_saved_weights_reload_with_identical_logits(tmp_path: Path, digits) -> None:
    from safetensors.torch import load_file

    from pipelines.io import save_weights
    from pipelines.models.encoder import Classifier, Encoder, load_classifier, load_encoder
    from pipelines.models.probes import extract_features, predict_logits

    torch.manual_seed(0)
    model = Classifier(Encoder(embedding_dim=32), 10).eval()
    save_weights(model, tmp_path, model.config, name="model")
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(model.state_dict())
    images = digits["val"].images[:50]
    reloaded = load_classifier(tmp_path)
    assert not reloaded.training
    assert np.array_equal(predict_logits(model, images), predict_logits(reloaded, images))
    assert np.array_equal(
        extract_features(model.encoder, images), extract_features(load_encoder(tmp_path), images)
    )


class RecordingTracker:
    """Stands in for StageTracker: keeps every call."""

    run_id = None  # no MLflow run: checkpoints have no owner

    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int]] = []
        self.datasets: list[tuple[str, str, str]] = []
        self.artifacts: list[str] = []

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        self.metrics.append((dict(metrics), step))

    def log_dataset(self, name: str, path, digest: str, context: str) -> None:
        self.datasets.append((name, digest, context))

    def log_artifact(self, path, artifact_path=None) -> None:
        assert Path(path).exists()
        self.artifacts.append(str(path))

    def log_params(self, params) -> None:
        pass

    def set_tags(self, tags, on_parent: bool = False) -> None:
        pass


def test_pretrain_and_federate_stages_write_their_outputs(tmp_path: Path, digits) -> None:
    from pipelines.models.encoder import load_classifier
    from pipelines.stages import federate, pretrain

    paths = Paths(tmp_path)
    parts = paths.partitions
    (parts / "clients").mkdir(parents=True)
    write_image_table(digits["pool"], parts / "unlabeled.parquet")
    write_image_table(digits["val"], parts / "val.parquet")
    write_image_table(digits["val"], parts / "test.parquet")
    for k, client in enumerate(clients_of(digits)):
        write_image_table(client, parts / "clients" / f"client_{k:03d}.parquet")
    params = Params(
        common=CommonParams(seed=0, device="cpu"),
        pretrain=PretrainParams(epochs=2, batch_size=256, embedding_dim=32, projection_dim=16),
        federate=FederateParams(rounds=2, local_epochs=1, batch_size=64),
    )

    # partition declared the pool a public split: the encoder says so (record DP reads it)
    write_json(parts / "manifest.json", {"unlabeled_source": "public split"})
    tracker = RecordingTracker()
    metrics = pretrain.run(params, paths, tracker)
    assert read_json(paths.model_dir("pretrain") / "encoder.json")["trained_on"] == "public split"
    assert set(metrics) == {
        "train_loss",
        "val_knn_accuracy",
        "val_linear_probe_accuracy",
        "epochs",
        "seconds",
        "samples_per_s",
    }
    assert read_json(paths.report("pretrain")) == pytest.approx(metrics)
    out = paths.model_dir("pretrain")
    assert {p.name for p in out.iterdir()} == {"encoder.safetensors", "encoder.json", "history.csv"}
    with (out / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"] and set(rows[0]) == {"epoch", "train_loss"}
    assert [step for m, step in tracker.metrics if set(m) == {"epoch_train_loss"}] == [1, 2]
    assert {name for name, _, _ in tracker.datasets} == {"unlabeled", "clients", "val"}

    tracker = RecordingTracker()
    metrics = federate.run(params, paths, tracker)
    assert metrics["rounds"] == 2 and metrics["clients"] == 3
    assert metrics["best_val_accuracy"] >= metrics["val_accuracy"] > 0.3
    assert read_json(paths.report("federate")) == pytest.approx(metrics)
    out = paths.model_dir("federate")
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "model.json",
        "rounds.csv",
        "sites.json",
    }
    sites = read_json(out / "sites.json")  # in simulation: each client shard, no held-out rows
    assert [s["site"] for s in sites] == ["client_000", "client_001", "client_002"]
    assert all(s["rows"] > 0 and s["holdout_rows"] == 0 for s in sites)
    with (out / "rounds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "round",
        "val_accuracy",
        "train_loss",
        "accepted",
        "rejected",
        "dropped",
    ]
    assert len(rows) == 2 and [r["accepted"] for r in rows] == ["3", "3"]
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    per_round = [step for m, step in tracker.metrics if "round_val_accuracy" in m]
    assert per_round == [1, 2]
    model = load_classifier(out)
    val = digits["val"]
    with torch.no_grad():
        logits = model(torch.from_numpy(val.images))
    accuracy = float((logits.argmax(1).numpy() == val.labels).mean())
    assert accuracy == pytest.approx(metrics["val_accuracy"])
