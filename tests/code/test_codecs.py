"""Compress-stage encodings: lossless is exact, lossy errors are bounded and measured."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.config import CompressParams, Params
from pipelines.data.codecs import (
    BASIS_FILE,
    TABLE_FILE,
    compress_table,
    dequantize_uint8,
    quantize_uint8,
    raw_bytes,
    read_compressed,
)
from pipelines.errors import DataError
from pipelines.io import ImageTable, Paths, read_image_table, write_image_table, write_json


class RecordingTracker:
    """Stands in for StageTracker: records what a stage logs."""

    def __init__(self):
        self.metrics, self.datasets, self.artifacts = [], [], []

    def log_metrics(self, metrics, step=0):
        self.metrics.append(dict(metrics))

    def log_dataset(self, name, path, digest, context):
        self.datasets.append((name, str(path), digest, context))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(str(path))


def low_rank_table(n: int = 60, rank: int = 6, seed: int = 0) -> ImageTable:
    """Images near a rank-``rank`` subspace, so PCA error falls as components grow."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, 64))
    weights = rng.normal(size=(n, rank)) * np.linspace(4, 0.5, rank)
    flat = 8 + weights @ basis + 0.01 * rng.normal(size=(n, 64))
    return ImageTable(flat.reshape(n, 8, 8).astype(np.float32), np.arange(n) % 4, 4)


def test_lossless_round_trip_is_exact(tmp_path):
    table = low_rank_table()
    encoding, decoded, metrics = compress_table(table, tmp_path, CompressParams())
    assert encoding == {"kind": "lossless"}
    np.testing.assert_array_equal(read_compressed(tmp_path).images, table.images)
    np.testing.assert_array_equal(decoded.labels, table.labels)
    assert decoded.num_classes == 4
    assert metrics["reconstruction_rmse"] == metrics["max_abs_error"] == 0.0
    assert metrics["relative_rmse"] == 0.0
    # the plain contract reader sees the same table
    np.testing.assert_array_equal(read_image_table(tmp_path / TABLE_FILE).images, table.images)


def test_ratio_is_raw_bytes_over_bytes_on_disk(tmp_path):
    table = ImageTable(np.zeros((200, 8, 8), np.float32), np.zeros(200, np.int64), 2)
    _, _, metrics = compress_table(table, tmp_path, CompressParams())
    assert metrics["raw_bytes"] == raw_bytes(table) == 200 * 64 * 4 + 200 * 8
    assert metrics["file_bytes"] == (tmp_path / TABLE_FILE).stat().st_size
    assert metrics["compression_ratio"] == pytest.approx(
        metrics["raw_bytes"] / metrics["file_bytes"]
    )
    assert metrics["compression_ratio"] > 10  # all zeros compress well
    assert metrics["encode_mb_per_s"] > 0 and metrics["decode_mb_per_s"] > 0


def test_uint8_error_is_positive_and_within_half_a_step(tmp_path):
    table = low_rank_table()
    encoding, decoded, metrics = compress_table(
        table, tmp_path, CompressParams(quantize_uint8=True)
    )
    assert encoding["kind"] == "uint8"
    half_step = encoding["scale"] / 2
    error = np.abs(decoded.images - table.images).max()
    assert 0 < error <= half_step * 1.001
    assert metrics["max_abs_error"] == pytest.approx(error)
    assert 0 < metrics["relative_rmse"] < 0.01


def test_quantize_per_column_keeps_each_columns_range():
    values = np.stack([np.linspace(0, 1, 50), np.linspace(-1000, 1000, 50)], axis=1)
    q, scale, offset = quantize_uint8(values, per_column=True)
    back = dequantize_uint8(q, scale, offset)
    assert q.dtype == np.uint8 and np.asarray(scale).shape == (2,)
    assert np.abs(back - values).max(axis=0)[0] <= 1 / 255 / 2 + 1e-6


def test_pca_error_falls_with_more_components(tmp_path):
    table = low_rank_table()
    errors = []
    for k in (1, 3, 6):
        folder = tmp_path / f"k{k}"
        encoding, decoded, metrics = compress_table(table, folder, CompressParams(pca_components=k))
        assert encoding["components"] == k and (folder / BASIS_FILE).is_file()
        assert metrics["file_bytes"] == sum(f.stat().st_size for f in folder.iterdir())
        np.testing.assert_allclose(read_compressed(folder).images, decoded.images)
        errors.append(metrics["reconstruction_rmse"])
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05  # the data has rank 6 plus a little noise


def test_pca_components_above_the_data_are_lowered(tmp_path):
    table = low_rank_table(n=10)
    encoding, _, metrics = compress_table(table, tmp_path, CompressParams(pca_components=500))
    assert encoding["components"] == 10
    assert metrics["max_abs_error"] < 1e-3


def test_pca_with_uint8_coefficients_decodes_close(tmp_path):
    table = low_rank_table()
    encoding, decoded, _ = compress_table(
        table, tmp_path, CompressParams(pca_components=6, quantize_uint8=True)
    )
    assert encoding["coefficients"]["kind"] == "uint8"
    assert len(encoding["coefficients"]["scale"]) == 6
    assert np.sqrt(np.mean((decoded.images - table.images) ** 2)) < 0.1


def test_parquet_options_reach_the_file(tmp_path):
    import pyarrow.parquet as pq

    table = low_rank_table(n=300)
    p = CompressParams(byte_stream_split=True, use_dictionary=True, row_group_size=100)
    compress_table(table, tmp_path, p)
    meta = pq.ParquetFile(tmp_path / TABLE_FILE).metadata
    assert meta.num_row_groups == 3
    group = meta.row_group(0)
    assert "BYTE_STREAM_SPLIT" in group.column(0).encodings
    assert "RLE_DICTIONARY" in group.column(1).encodings
    assert group.column(0).compression == "ZSTD"


def test_read_compressed_without_a_table_names_the_file(tmp_path):
    with pytest.raises(DataError, match=f"{TABLE_FILE}: file not found"):
        read_compressed(tmp_path)


def test_compress_stage_writes_manifest_and_report(tmp_path):
    from pipelines.stages import compress

    paths = Paths(tmp_path)
    paths.raw.mkdir(parents=True)
    table = low_rank_table()
    write_image_table(table, paths.raw / "table.parquet")
    write_json(paths.raw / "manifest.json", {"content_sha256": "abc"})
    tracker = RecordingTracker()
    params = Params(compress=CompressParams(quantize_uint8=True))
    metrics = compress.run(params, paths, tracker)
    manifest = json.loads((paths.compressed / "manifest.json").read_text())
    assert manifest["source_content_sha256"] == "abc"
    assert manifest["encoding"]["kind"] == "uint8" and manifest["lossy"] is True
    assert manifest["pixel_max"] == pytest.approx(float(table.images.max()))
    assert json.loads(paths.report("compress").read_text()) == pytest.approx(metrics)
    assert tracker.metrics == [metrics] and tracker.datasets[0][0] == "compressed"
    assert metrics["reconstruction_rmse"] > 0
    assert sorted(p.name for p in paths.compressed.iterdir()) == ["manifest.json", TABLE_FILE]
