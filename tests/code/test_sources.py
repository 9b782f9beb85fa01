"""Each ingest loader reads a tiny file it wrote itself back into the same table."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from pipelines.config import IngestParams
from pipelines.data.sources import load_source, read_idx
from pipelines.data.validate import rows_to_images, validate_table
from pipelines.errors import DataError
from pipelines.io import ImageTable, write_image_table

N, H, W, CLASSES = 12, 4, 4, 3


@pytest.fixture
def table() -> ImageTable:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (N, H, W)).astype(np.float32)
    labels = np.arange(N, dtype=np.int64) % CLASSES
    return ImageTable(images, labels, CLASSES)


def params(source: str, path, **extra) -> IngestParams:
    return IngestParams(source=source, path=str(path), **extra)


def assert_same(loaded: ImageTable, expected: ImageTable) -> None:
    assert loaded.images.dtype == np.float32 and loaded.labels.dtype == np.int64
    np.testing.assert_array_equal(loaded.images, expected.images)
    np.testing.assert_array_equal(loaded.labels, expected.labels)
    assert loaded.num_classes == expected.num_classes


def write_csv(path, table: ImageTable, header: list[str] | None = None) -> None:
    flat = table.images.reshape(len(table), -1)
    header = header or ["label", *(f"p{i}" for i in range(flat.shape[1]))]
    lines = [",".join(header)]
    lines += [
        ",".join([str(y), *(f"{v:g}" for v in row)])
        for y, row in zip(table.labels, flat, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_digits_is_the_bundled_set(tmp_path):
    loaded = load_source(IngestParams(), tmp_path)
    assert loaded.images.shape == (1797, 1, 8, 8)
    assert loaded.num_classes == 10
    assert loaded.images.max() == 16.0 and loaded.images.min() == 0.0


def test_parquet_contract_round_trip(tmp_path, table):
    write_image_table(table, tmp_path / "t.parquet")
    assert_same(load_source(params("parquet", "t.parquet"), tmp_path), table)


def test_parquet_wide_round_trip_uses_label_column(tmp_path, table):
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = table.images.reshape(N, -1)
    columns = {f"px{i}": pa.array(flat[:, i]) for i in range(H * W)}
    columns["digit"] = pa.array(table.labels)
    pq.write_table(pa.table(columns), tmp_path / "wide.parquet")
    loaded = load_source(params("parquet", "wide.parquet", label_column="digit"), tmp_path)
    assert_same(loaded, table)


def test_csv_round_trip_with_relative_path(tmp_path, table):
    (tmp_path / "in").mkdir()
    write_csv(tmp_path / "in" / "t.csv", table)
    assert_same(load_source(params("csv", "in/t.csv"), tmp_path), table)


def test_csv_non_square_rows_need_image_shape(tmp_path, table):
    wide = ImageTable(table.images.reshape(N, 2, 8), table.labels, CLASSES)
    write_csv(tmp_path / "t.csv", ImageTable(table.images, table.labels, CLASSES))
    assert_same(load_source(params("csv", "t.csv", image_shape=(2, 8)), tmp_path), wide)
    with pytest.raises(DataError, match=r"image_shape \[3, 5\] needs 15"):
        load_source(params("csv", "t.csv", image_shape=(3, 5)), tmp_path)


@pytest.mark.parametrize("flat", [False, True])
def test_npz_round_trip_3d_and_2d(tmp_path, table, flat):
    x = table.images.reshape(N, -1) if flat else table.images
    np.savez(tmp_path / "t.npz", x=x, y=table.labels)
    assert_same(load_source(params("npz", "t.npz"), tmp_path), table)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_plain_and_gzip(tmp_path, table, compress):
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"img.idx{suffix}", table.images[:, 0], compress)
    write_idx(tmp_path / f"lab.idx{suffix}", table.labels, compress)
    p = IngestParams(source="idx", path=f"img.idx{suffix}", labels_path=f"lab.idx{suffix}")
    assert_same(load_source(p, tmp_path), table)


def test_idx_header_is_checked_against_size(tmp_path, table):
    write_idx(tmp_path / "img.idx", table.images[:, 0])
    data = (tmp_path / "img.idx").read_bytes()
    (tmp_path / "cut.idx").write_bytes(data[:-5])
    assert read_idx(tmp_path / "img.idx").shape == (N, H, W)
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "cut.idx")
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04" + data[4:])
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "bad.idx")


def test_images_folder_classes_are_sorted_folder_names(tmp_path, table):
    from PIL import Image

    names = ["cat", "ant", "bee"]  # sorted: ant=0, bee=1, cat=2
    for i, (image, label) in enumerate(zip(table.images, table.labels, strict=True)):
        folder = tmp_path / "tree" / sorted(names)[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].astype(np.uint8), mode="L").save(folder / f"{i:03d}.png")
    (tmp_path / "tree" / "ant" / "notes.txt").write_text("not an image")
    loaded = load_source(params("images", "tree"), tmp_path)
    order = np.argsort(table.labels, kind="stable")  # files come class by class
    assert_same(loaded, table.subset(order))


def test_rgb_images_stay_colour_channel_first(tmp_path):
    from PIL import Image

    for label in (0, 1):
        (tmp_path / str(label)).mkdir()
        rgb = np.zeros((3, 5, 3), dtype=np.uint8)
        rgb[..., 0], rgb[..., 2] = 60 * (label + 1), 7
        Image.fromarray(rgb, mode="RGB").save(tmp_path / str(label) / "a.png")
    loaded = load_source(params("images", tmp_path), tmp_path)
    assert loaded.images.shape == (2, 3, 3, 5) and loaded.channels == 3
    np.testing.assert_array_equal(loaded.images[1, 0], 120.0)
    np.testing.assert_array_equal(loaded.images[1, 1], 0.0)
    np.testing.assert_array_equal(loaded.images[1, 2], 7.0)


def test_num_classes_from_params_or_max_label(tmp_path, table):
    np.savez(tmp_path / "t.npz", x=table.images, y=table.labels)
    assert load_source(params("npz", "t.npz"), tmp_path).num_classes == CLASSES
    assert load_source(params("npz", "t.npz", num_classes=7), tmp_path).num_classes == 7


def test_float_labels_must_be_whole_numbers(tmp_path, table):
    np.savez(tmp_path / "ok.npz", x=table.images, y=table.labels.astype(float))
    assert_same(load_source(params("npz", "ok.npz"), tmp_path), table)
    y = table.labels.astype(float)
    y[5] = 1.5
    np.savez(tmp_path / "bad.npz", x=table.images, y=y)
    with pytest.raises(DataError, match=r"field 'y', row 5: label 1.5 is not an integer"):
        load_source(params("npz", "bad.npz"), tmp_path)


def test_csv_problems_name_column_row_and_line(tmp_path, table):
    write_csv(tmp_path / "t.csv", table)
    lines = (tmp_path / "t.csv").read_text().splitlines()
    cells = lines[4].split(",")
    cells[3] = "oops"
    lines[4] = ",".join(cells)
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        load_source(params("csv", "t.csv"), tmp_path)
    assert caught.value.field == "p2" and caught.value.row == 3
    assert "'oops' is not a number (line 5)" in str(caught.value)


def test_rows_to_images_square_root_or_error():
    assert rows_to_images(np.zeros((2, 9)), None, "f").shape == (2, 1, 3, 3)
    with pytest.raises(DataError, match="not a square number"):
        rows_to_images(np.zeros((2, 10)), None, "f")


def test_validate_table_reports_first_non_finite_row(table):
    images = table.images.copy()
    images[4, 0, 1, 2] = np.inf
    images[9, 0, 0, 0] = np.nan
    with pytest.raises(DataError) as caught:
        validate_table(ImageTable(images, table.labels, CLASSES), "f.npz")
    assert caught.value.row == 4 and "pixel 6" in str(caught.value)
