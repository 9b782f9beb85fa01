"""Splits and client shards: disjoint, seeded, stratified, skewed as asked, never too small."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.config import CompressParams, Params, PartitionParams
from pipelines.data.codecs import encode_table
from pipelines.data.splits import (
    label_histograms,
    label_skew,
    select_labeled,
    shard_clients,
    split_holdout,
    split_public,
)
from pipelines.errors import ConfigError
from pipelines.io import ImageTable, Paths, read_image_table, write_json

LABELS = np.repeat(np.arange(10), 60)  # 600 rows, 60 per class


def test_holdout_is_a_disjoint_cover_with_the_asked_sizes():
    train, val, test = split_holdout(LABELS, 0.2, 0.1, seed=1)
    assert (len(train), len(val), len(test)) == (420, 60, 120)
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(600))


def test_holdout_is_stratified_and_seeded():
    train, val, test = split_holdout(LABELS, 0.2, 0.1, seed=1)
    assert np.bincount(LABELS[test]).tolist() == [12] * 10
    assert np.bincount(LABELS[val]).tolist() == [6] * 10
    again = split_holdout(LABELS, 0.2, 0.1, seed=1)
    other = split_holdout(LABELS, 0.2, 0.1, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(test, other[2])


def test_holdout_falls_back_when_a_class_is_too_small():
    labels = np.array([0] * 30 + [1])  # class 1 has one row: cannot stratify
    train, val, test = split_holdout(labels, 0.2, 0.1, seed=0)
    assert len(train) + len(val) + len(test) == 31


def test_labeled_fraction_is_stratified_subset():
    labeled = select_labeled(LABELS, 0.1, seed=3)
    assert len(labeled) == 60 and len(np.unique(labeled)) == 60
    assert np.bincount(LABELS[labeled]).tolist() == [6] * 10
    assert np.array_equal(select_labeled(LABELS, 1.0, seed=3), np.arange(600))


@pytest.mark.parametrize("skew", ["iid", "dirichlet"])
def test_shards_are_disjoint_and_cover_every_row(skew):
    shards = shard_clients(LABELS, 7, skew, 0.5, 10, seed=0)
    assert len(shards) == 7
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(600))


def test_small_alpha_is_more_skewed_than_iid():
    def skew_of(kind, alpha):
        shards = shard_clients(LABELS, 5, kind, alpha, 10, seed=0)
        return label_skew(label_histograms(LABELS, shards, 10))

    iid, mild, strong = skew_of("iid", 1.0), skew_of("dirichlet", 100.0), skew_of("dirichlet", 0.1)
    assert iid < 0.15
    assert strong > 0.5
    assert iid < strong and mild < strong


def test_shards_are_seeded():
    a = shard_clients(LABELS, 5, "dirichlet", 0.3, 10, seed=4)
    b = shard_clients(LABELS, 5, "dirichlet", 0.3, 10, seed=4)
    c = shard_clients(LABELS, 5, "dirichlet", 0.3, 10, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_every_client_gets_min_rows_even_with_extreme_skew(caplog):
    # alpha 0.01 with 30 clients almost never gives everyone 20 rows: the repair must.
    with caplog.at_level("INFO", logger="pipelines.data.splits"):
        shards = shard_clients(LABELS, 30, "dirichlet", 0.01, 20, seed=0)
    assert "moving rows to repair" in caplog.text
    assert min(len(s) for s in shards) >= 20
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(600))


def test_too_few_rows_for_the_clients_is_a_clear_error():
    with pytest.raises(ConfigError, match="600 labeled rows cannot give 40 clients 20 rows"):
        shard_clients(LABELS, 40, "iid", 1.0, 20, seed=0)


def test_label_skew_against_hand_computed_values():
    same = np.array([[5, 5], [10, 10]])
    assert label_skew(same) == 0.0
    # overall mix [0.5, 0.5]; client mixes [1, 0] and [0, 1]: TV 0.5 each
    assert label_skew(np.array([[4, 0], [0, 4]])) == pytest.approx(0.5)
    assert label_histograms(
        np.array([0, 1, 1, 2]), [np.array([0, 1]), np.array([2, 3])], 4
    ).tolist() == [
        [1, 1, 0, 0],
        [0, 1, 1, 0],
    ]


class RecordingTracker:
    def __init__(self):
        self.metrics, self.datasets, self.artifacts = [], [], []

    def log_metrics(self, metrics, step=0):
        self.metrics.append(dict(metrics))

    def log_dataset(self, name, path, digest, context):
        self.datasets.append(name)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))


def test_partition_stage_writes_normalized_consistent_shards(tmp_path):
    from pipelines.stages import partition

    paths = Paths(tmp_path)
    rng = np.random.default_rng(0)
    table = ImageTable(rng.integers(0, 17, (600, 4, 4)).astype(np.float32), LABELS, 10)
    encode_table(table, paths.compressed, CompressParams())
    write_json(
        paths.compressed / "manifest.json",
        {"pixel_min": 0.0, "pixel_max": 16.0, "source_content_sha256": "abc"},
    )
    p = PartitionParams(num_clients=4, labeled_fraction=0.5, min_client_rows=5)
    tracker = RecordingTracker()
    metrics = partition.run(Params(partition=p), paths, tracker)

    out = paths.partitions
    test, val = read_image_table(out / "test.parquet"), read_image_table(out / "val.parquet")
    pool = read_image_table(out / "unlabeled.parquet")
    clients = [read_image_table(f) for f in sorted((out / "clients").glob("*.parquet"))]
    assert [f.name for f in sorted((out / "clients").iterdir())][0] == "client_000.parquet"
    assert (len(test), len(val), len(pool)) == (120, 60, 420)
    assert sum(len(c) for c in clients) == metrics["labeled_rows"] == 210
    for part in (test, val, pool, *clients):
        assert part.images.dtype == np.float32
        assert part.images.min() >= 0.0 and part.images.max() <= 1.0
    np.testing.assert_allclose(test.images.max(), 1.0)
    # no test or val image appears in the training pool (rows are unique in this table)
    seen = {row.tobytes() for row in pool.images}
    assert not any(row.tobytes() in seen for row in (*test.images, *val.images))
    assert all(row.tobytes() in seen for c in clients for row in c.images)

    manifest = json.loads((out / "manifest.json").read_text())
    histograms = np.array(list(manifest["client_label_histograms"].values()))
    assert histograms.tolist() == [np.bincount(c.labels, minlength=10).tolist() for c in clients]
    assert manifest["seed"] == 42 and manifest["alpha"] == 0.5 and manifest["skew"] == "dirichlet"
    assert metrics["min_client_rows"] == min(len(c) for c in clients) >= 5
    assert metrics["label_skew"] == pytest.approx(label_skew(histograms))
    assert (out / "client_labels.png").stat().st_size > 1000
    assert json.loads(paths.report("partition").read_text()) == pytest.approx(metrics)
    assert tracker.metrics == [metrics]
    assert set(tracker.datasets) == {"test", "val", "unlabeled", "clients"}
    assert manifest["unlabeled_source"] == "client rows" and metrics["public_rows"] == 0


def test_a_public_split_is_stratified_and_refuses_to_take_every_row():
    private, public = split_public(LABELS, 0.25, seed=3)
    assert len(public) == 150 and np.bincount(LABELS[public]).tolist() == [15] * 10
    assert np.array_equal(np.sort(np.concatenate([private, public])), np.arange(600))
    assert len(split_public(LABELS, 0.0, seed=3)[1]) == 0
    with pytest.raises(ConfigError, match="public_fraction 0.9999: .* leave none"):
        split_public(LABELS, 0.9999, seed=3)


def test_the_public_split_is_the_unlabeled_pool_and_no_client_holds_it(tmp_path):
    from pipelines.stages import partition

    paths = Paths(tmp_path)
    rng = np.random.default_rng(0)
    table = ImageTable(rng.integers(0, 17, (600, 4, 4)).astype(np.float32), LABELS, 10)
    encode_table(table, paths.compressed, CompressParams())
    write_json(paths.compressed / "manifest.json", {"pixel_min": 0.0, "pixel_max": 16.0})
    p = PartitionParams(num_clients=4, public_fraction=0.25, min_client_rows=5)
    metrics = partition.run(Params(partition=p), paths, RecordingTracker())

    out = paths.partitions
    pool = read_image_table(out / "unlabeled.parquet")
    clients = [read_image_table(f) for f in sorted((out / "clients").glob("*.parquet"))]
    assert metrics["train_rows"] == 420 and metrics["public_rows"] == len(pool) == 105
    assert metrics["labeled_rows"] == sum(len(c) for c in clients) == 420 - 105
    public = {row.tobytes() for row in pool.images}
    assert not any(row.tobytes() in public for c in clients for row in c.images)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unlabeled_source"] == "public split"
    assert manifest["rows"]["public_rows"] == 105
