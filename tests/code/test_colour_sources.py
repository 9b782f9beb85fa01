"""Colour input in every format that can hold it, mixed inputs refused, and ingest.resize."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.config import IngestParams
from pipelines.data.codecs import read_compressed
from pipelines.data.sources import load_source
from pipelines.errors import DataError
from pipelines.io import ImageTable, read_image_table, write_image_table

N, H, W, CLASSES = 9, 5, 6, 3


@pytest.fixture
def rgb() -> tuple[np.ndarray, np.ndarray]:
    """Channel-last uint8 images (n, h, w, 3) and their labels."""
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (N, H, W, 3)).astype(np.uint8), np.arange(N) % CLASSES


def params(source: str, path, **extra) -> IngestParams:
    return IngestParams(source=source, path=str(path), **extra)


def channel_first(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).astype(np.float32)


def write_folders(root, images, labels, suffix=".png", mode=None) -> None:
    from PIL import Image

    for row, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        (picture.convert(mode) if mode else picture).save(folder / f"{row:02d}{suffix}")


def test_png_folders_read_as_rgb_channel_first(tmp_path, rgb):
    images, labels = rgb
    write_folders(tmp_path / "tree", images, labels)
    loaded = load_source(params("images", "tree"), tmp_path)
    order = np.argsort(labels, kind="stable")
    assert loaded.channels == 3 and loaded.images.shape == (N, 3, H, W)
    np.testing.assert_array_equal(loaded.images, channel_first(images[order]))


def test_jpeg_folders_read_as_rgb(tmp_path, rgb):
    images, labels = rgb
    flat = np.repeat(np.repeat(images[:, :1, :1], H, 1), W, 2)  # one colour per image
    write_folders(tmp_path / "tree", flat, labels, suffix=".jpg")
    loaded = load_source(params("images", "tree"), tmp_path)
    order = np.argsort(labels, kind="stable")
    assert loaded.images.shape == (N, 3, H, W)
    # JPEG is lossy: a flat colour comes back within a few levels
    np.testing.assert_allclose(loaded.images, channel_first(flat[order]), atol=8)


def test_npz_channel_last_and_channel_first(tmp_path, rgb):
    images, labels = rgb
    np.savez(tmp_path / "last.npz", x=images, y=labels)
    np.savez(tmp_path / "first.npz", x=channel_first(images), y=labels)
    for name in ("last.npz", "first.npz"):
        loaded = load_source(params("npz", name), tmp_path)
        np.testing.assert_array_equal(loaded.images, channel_first(images))


def test_parquet_contract_keeps_channels(tmp_path, rgb):
    images, labels = rgb
    write_image_table(ImageTable(channel_first(images), labels, CLASSES), tmp_path / "t.parquet")
    loaded = load_source(params("parquet", "t.parquet"), tmp_path)
    np.testing.assert_array_equal(loaded.images, channel_first(images))
    assert read_image_table(tmp_path / "t.parquet").channels == 3


def test_wide_parquet_with_channel_last_image_shape(tmp_path, rgb):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = rgb
    flat = images.reshape(N, -1)
    columns = {f"px{i}": pa.array(flat[:, i]) for i in range(flat.shape[1])}
    columns["label"] = pa.array(labels)
    pq.write_table(pa.table(columns), tmp_path / "wide.parquet")
    loaded = load_source(params("parquet", "wide.parquet", image_shape=(H, W, 3)), tmp_path)
    np.testing.assert_array_equal(loaded.images, channel_first(images))


def test_mixed_channels_are_refused_naming_the_file(tmp_path, rgb):
    images, labels = rgb
    write_folders(tmp_path / "tree", images[:4], labels[:4])
    write_folders(tmp_path / "tree", images[4:5], [0], mode="L")  # class_0/00.png, grayscale
    with pytest.raises(DataError, match=r"00\.png.*grayscale.*all images must be grayscale or"):
        load_source(params("images", "tree"), tmp_path)


def test_mixed_sizes_need_resize_then_are_accepted(tmp_path, rgb):
    from PIL import Image

    images, labels = rgb
    write_folders(tmp_path / "tree", images, labels)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "tree/class_2/99.png")
    with pytest.raises(DataError, match=r"99\.png.*12x10.*same size \(or set ingest.resize\)"):
        load_source(params("images", "tree"), tmp_path)
    loaded = load_source(params("images", "tree", resize=(8, 8)), tmp_path)
    assert loaded.images.shape == (N + 1, 3, 8, 8)


def test_resize_applies_to_array_sources_and_keeps_the_scale(tmp_path):
    flat = np.full((4, 1, 6, 6), 200.0, np.float32)
    np.savez(tmp_path / "g.npz", x=flat[:, 0], y=np.array([0, 1, 0, 1]))
    loaded = load_source(params("npz", "g.npz", resize=(12, 3)), tmp_path)
    assert loaded.images.shape == (4, 1, 12, 3)
    np.testing.assert_allclose(loaded.images, 200.0, rtol=1e-5)


def test_four_channels_are_refused(tmp_path):
    np.savez(tmp_path / "rgba.npz", x=np.zeros((3, 4, 4, 4)), y=np.array([0, 1, 0]))
    with pytest.raises(DataError, match=r"rgba\.npz.*field 'x'.*c = 1 or 3"):
        load_source(params("npz", "rgba.npz"), tmp_path)


@pytest.mark.parametrize("encoding", ["float32", "uint8", "pca"])
def test_compress_round_trips_rgb(tmp_path, rgb, encoding):
    from pipelines.config import CompressParams
    from pipelines.data.codecs import encode_table

    images, labels = rgb
    table = ImageTable(channel_first(images), labels, CLASSES)
    p = CompressParams(
        quantize_uint8=encoding == "uint8", pca_components=N if encoding == "pca" else 0
    )
    encode_table(table, tmp_path / "enc", p)
    decoded = read_compressed(tmp_path / "enc")
    assert decoded.images.shape == table.images.shape and decoded.channels == 3
    np.testing.assert_allclose(
        decoded.images, table.images, atol=1.0 if encoding == "uint8" else 1e-2
    )


def test_ingest_manifest_records_channels_and_resize(tmp_path, rgb):
    from pipelines.config import load_params
    from pipelines.io import Paths
    from pipelines.stages import ingest

    images, labels = rgb
    np.savez(tmp_path / "c.npz", x=images, y=labels)
    (tmp_path / "params.yaml").write_text(
        "ingest:\n  source: npz\n  path: c.npz\n  resize: [10, 10]\n"
    )

    class NoTracker:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    params = load_params(tmp_path / "params.yaml")
    metrics = ingest.run(params, Paths(tmp_path), NoTracker())
    manifest = json.loads((tmp_path / "data/raw/manifest.json").read_text())
    assert manifest["channels"] == 3 and manifest["resize"] == [10, 10]
    assert manifest["image_shape"] == [10, 10] and metrics["channels"] == 3
    assert read_image_table(tmp_path / "data/raw/table.parquet").images.shape == (N, 3, 10, 10)


def test_example_data_command_writes_a_set_ingest_reads(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["example-data", "rgb32-npz", str(tmp_path / "ex")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    sets = dict(line.removeprefix("--set ingest.").split("=", 1) for line in lines)
    loaded = load_source(IngestParams(**sets), tmp_path)
    assert loaded.images.shape == (1797, 3, 32, 32) and loaded.num_classes == 10
    # foreground and background differ in every image: no digit is invisible
    spread = loaded.images.reshape(1797, 3, -1).std(axis=2).max(axis=1)
    assert spread.min() > 20
