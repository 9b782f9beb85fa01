"""Tables read and written batch by batch: same content, same digests, bounded batches."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import IngestParams, Params
from pipelines.data.sources import open_source
from pipelines.errors import DataError
from pipelines.io import (
    ContentHasher,
    ImageTable,
    ImageTableWriter,
    Paths,
    TableStream,
    content_sha256,
    iter_image_batches,
    read_image_table,
)


@pytest.fixture
def table() -> ImageTable:
    rng = np.random.default_rng(0)
    return ImageTable(
        rng.integers(0, 256, (50, 3, 4, 5)).astype(np.float32), rng.integers(0, 4, 50), 4
    )


def write_in_batches(path, table: ImageTable, rows: int, dtype: str = "float32") -> None:
    with ImageTableWriter(path, 3, (4, 5), 4, pixel_dtype=dtype) as writer:
        for start in range(0, len(table), rows):
            writer.write(table.images[start : start + rows], table.labels[start : start + rows])


def test_batched_write_and_read_give_the_same_table(tmp_path, table):
    write_in_batches(tmp_path / "t.parquet", table, rows=7, dtype="uint8")
    back = read_image_table(tmp_path / "t.parquet")
    np.testing.assert_array_equal(back.images, table.images)
    sizes = [len(b) for b in iter_image_batches(tmp_path / "t.parquet", batch_rows=12)]
    assert sum(sizes) == 50 and max(sizes) <= 12


def test_hasher_gives_content_sha256_whatever_the_batches(table):
    hasher = ContentHasher(len(table), 3, (4, 5), 4)
    for start in range(0, 50, 9):
        hasher.update(table.images[start : start + 9], table.labels[start : start + 9])
    assert hasher.hexdigest() == content_sha256(table)
    gray = ImageTable(table.images[:, 0], table.labels, 4)
    assert content_sha256(gray) != content_sha256(table)


def test_streamed_contract_parquet_reports_a_bad_pixel_with_its_file_row(tmp_path, table):
    images = table.images.copy()
    images[43, 1, 2, 3] = np.nan
    bad = ImageTable(images, table.labels, 4)
    write_in_batches(tmp_path / "bad.parquet", bad, rows=10)
    stream = open_source(IngestParams(source="parquet", path="bad.parquet"), tmp_path)
    assert stream.layout.rows == 50 and stream.layout.channels == 3
    with pytest.raises(DataError, match=r"bad\.parquet.*field 'image'.*row 43"):
        for _ in stream.batches():
            pass


def test_ingest_of_a_bad_stream_writes_nothing(tmp_path, table):
    from pipelines.stages import ingest

    images = table.images.copy()
    images[-1, 0, 0, 0] = np.inf
    write_in_batches(tmp_path / "bad.parquet", ImageTable(images, table.labels, 4), rows=10)

    class NoTracker:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    params = Params(ingest=IngestParams(source="parquet", path="bad.parquet"))
    with pytest.raises(DataError, match="row 49"):
        ingest.run(params, Paths(tmp_path), NoTracker())
    assert not (tmp_path / "data" / "raw").exists()
    assert not list((tmp_path / "data").glob(".raw*"))  # no staged leftovers


def test_streaming_images_cover_every_row_once_per_epoch(tmp_path, table):
    from pipelines.models.streaming import StreamingImages

    write_in_batches(tmp_path / "t.parquet", table, rows=50)
    stream = TableStream.from_file(tmp_path / "t.parquet", batch_rows=16)
    dataset = StreamingImages(stream, batch_size=8, seed=3)
    epochs = []
    for _ in range(2):
        batches = [b for (b,) in dataset]
        assert all(len(b) <= 8 for b in batches)
        epochs.append(np.concatenate([b.numpy() for b in batches]))
    for seen in epochs:
        key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
        assert key(seen) == key(table.images)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_pretrain_reads_a_pool_over_the_budget_from_disk(tmp_path):
    from sklearn.datasets import load_digits

    from pipelines.config import PretrainParams
    from pipelines.io import read_within_budget, write_image_table
    from pipelines.stages.pretrain import pretrain

    data = load_digits()
    pool = ImageTable((data.images[:300] / 16).astype(np.float32), data.target[:300], 10)
    write_image_table(pool, tmp_path / "u.parquet")
    streamed = read_within_budget(tmp_path / "u.parquet", budget_mb=0.05)
    assert isinstance(streamed, TableStream)
    assert isinstance(read_within_budget(tmp_path / "u.parquet", budget_mb=16), ImageTable)
    assert streamed.content_sha256() == content_sha256(pool)
    p = PretrainParams(epochs=3, batch_size=64, embedding_dim=16)
    encoder, losses = pretrain(streamed, p, 0, "cpu")
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_streamed_labels_stay_with_their_images(tmp_path, table):
    from pipelines.models.streaming import StreamingImages

    write_in_batches(tmp_path / "t.parquet", table, rows=50)
    stream = TableStream.from_file(tmp_path / "t.parquet", batch_rows=16)
    seen = {}
    for images, labels in StreamingImages(stream, batch_size=8, seed=1, with_labels=True):
        for image, label in zip(images.numpy(), labels.numpy(), strict=True):
            seen[image.tobytes()] = int(label)
    pairs = zip(table.images, table.labels, strict=True)
    expected = {image.tobytes(): int(label) for image, label in pairs}
    assert seen == expected


def test_federate_clients_over_the_budget_are_read_from_disk(tmp_path):
    """Shards over ``common.memory_budget_mb`` come back as streams; the data digest, the
    clients' class statistics and a client fit work on them as on tables in memory."""
    import torch
    from sklearn.datasets import load_digits

    from pipelines.config import FederateParams
    from pipelines.federated.fedavg import client_class_statistics, train_client
    from pipelines.io import (
        concat_tables,
        read_client_shards,
        read_client_shards_within_budget,
        union_sha256,
        write_image_table,
    )
    from pipelines.models.encoder import build_classifier, classifier_config, encoder_config_for

    data = load_digits()
    images, labels = (data.images[:300] / 16).astype(np.float32), data.target[:300]
    (tmp_path / "clients").mkdir()
    for k, rows in enumerate((slice(0, 120), slice(120, 300))):
        shard = ImageTable(images[rows], labels[rows], 10)
        write_image_table(shard, tmp_path / "clients" / f"client_{k}.parquet")
    tables = [t for _, t in read_client_shards(tmp_path)]
    assert all(isinstance(t, ImageTable) for _, t in read_client_shards_within_budget(tmp_path, 16))
    streams = [t for _, t in read_client_shards_within_budget(tmp_path, budget_mb=0.05)]
    assert all(isinstance(s, TableStream) for s in streams)
    streams = [TableStream.from_file(p, batch_rows=32) for p in sorted(tmp_path.glob("*/*"))]
    assert union_sha256(streams, 10) == content_sha256(concat_tables(tables, 10))

    config = classifier_config(encoder_config_for((8, 8), 1, 16), 10)
    torch.manual_seed(0)
    state = build_classifier(config).state_dict()
    from_table = client_class_statistics(state, tables[1], "cpu", model_config=config)
    from_stream = client_class_statistics(state, streams[1], "cpu", model_config=config)
    for key in ("sums", "counts", "norm_sum"):
        torch.testing.assert_close(from_stream[key], from_table[key])

    p = FederateParams(local_epochs=6, batch_size=16, learning_rate=0.002)
    trained, rows, loss = train_client(state, streams[1], p, 0, "cpu", model_config=config)
    assert rows == 180 and np.isfinite(loss)
    model = build_classifier(config)
    model.load_state_dict(trained)
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(tables[1].images)).argmax(1).numpy()
    assert (predicted == tables[1].labels).mean() > 0.4  # chance: 0.1
