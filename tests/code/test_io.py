"""Atomic outputs, the image-table contract and safetensors round trips."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.errors import DataError
from pipelines.io import (
    ImageTable,
    atomic_outputs,
    content_sha256,
    load_weights,
    read_image_table,
    save_weights,
    write_image_table,
)


def _table(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return ImageTable(rng.random((n, 3, 4), dtype=np.float32), rng.integers(0, 3, n), 3)


def test_failed_block_keeps_previous_outputs(tmp_path):
    out_dir, report = tmp_path / "out", tmp_path / "reports" / "r.json"
    with atomic_outputs(dirs=[out_dir], files=[report]) as staged:
        (staged.path(out_dir) / "a.txt").write_text("old")
        staged.path(report).write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_outputs(dirs=[out_dir], files=[report]) as staged:
            (staged.path(out_dir) / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert (out_dir / "a.txt").read_text() == "old"
    assert report.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reports"]
    assert [p.name for p in report.parent.iterdir()] == ["r.json"]


def test_successful_block_replaces_outputs(tmp_path):
    out_dir = tmp_path / "out"
    for text in ("one", "two"):
        with atomic_outputs(dirs=[out_dir]) as staged:
            (staged.path(out_dir) / "a.txt").write_text(text)
    assert (out_dir / "a.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_missing_staged_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_outputs(files=[tmp_path / "never.json"]):
            pass


def test_image_table_round_trip_keeps_contract(tmp_path):
    import pyarrow.parquet as pq

    table = _table()
    write_image_table(table, tmp_path / "t.parquet")
    back = read_image_table(tmp_path / "t.parquet")
    np.testing.assert_array_equal(back.images, table.images)
    np.testing.assert_array_equal(back.labels, table.labels)
    assert back.num_classes == 3 and back.image_shape == (3, 4)
    schema = pq.read_schema(tmp_path / "t.parquet")
    assert schema.metadata[b"lepton.image_shape"] == b"[3, 4]"
    assert str(schema.field("label").type) == "int64"
    assert content_sha256(back) == content_sha256(table)
    assert content_sha256(_table(seed=1)) != content_sha256(table)


def test_read_missing_column_names_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        read_image_table(tmp_path / "bad.parquet")


def test_weights_are_safetensors(tmp_path):
    import torch

    module = torch.nn.Linear(3, 2)
    save_weights(module, tmp_path, {"in": 3, "out": 2})
    state, config = load_weights(tmp_path)
    assert config == {"in": 3, "out": 2}
    assert torch.equal(state["weight"], module.weight.detach())
    assert (tmp_path / "model.safetensors").read_bytes()[:8] != b"PK\x03\x04"  # not a zip pickle
