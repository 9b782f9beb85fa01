"""Malformed inputs fail the ingest stage with a DataError naming file, field and row.

Each case first ingests a good file, then a bad one through the real ``ingest.run`` under a
real MLflow stage run, and checks that the earlier ``data/raw`` and report are byte-identical
afterwards, that no staging leftovers (names starting with '.') remain, and that the MLflow
child run is marked FAILED.
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.config import IngestParams, Params
from pipelines.errors import DataError
from pipelines.io import ImageTable, Paths, write_image_table
from pipelines.stages import ingest
from pipelines.tracking import client, stage_run

N, SIDE, CLASSES = 10, 4, 3

# tracking.log_dataset resolves a file URI that two MLflow source types both accept
pytestmark = pytest.mark.filterwarnings("ignore:The specified dataset source:UserWarning")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module: creating it costs seconds, runs cost milliseconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def workspace(tmp_path, monkeypatch, mlflow_uri) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("LEPTON_PIPELINE_RUN", "test-bad-inputs")
    root = tmp_path / "ws"
    root.mkdir()
    write_csv(root / "good.csv", *rows())
    return root


def rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (N, SIDE * SIDE)).astype(float), np.arange(N) % CLASSES


def write_csv(path: Path, features, labels, header=None) -> None:
    header = header or ["label", *(f"p{i}" for i in range(features.shape[1]))]
    lines = [",".join(header)]
    lines += [
        ",".join([str(y), *(f"{v:g}" for v in row)])
        for y, row in zip(labels, features, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def run_ingest(root: Path, p: IngestParams):
    with stage_run("ingest", root, "lepton") as tracker:
        return tracker, ingest.run(Params(ingest=p), Paths(root), tracker)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(root)): f.read_bytes()
        for folder in ("data", "reports")
        for f in sorted((root / folder).rglob("*"))
        if f.is_file()
    }


# Each case writes a bad input into the workspace and returns its params and the
# fragments the error message must contain.
def empty_file(root):
    (root / "empty.csv").write_bytes(b"")
    return IngestParams(source="csv", path="empty.csv"), ["empty.csv", "file is empty"]


def truncated_parquet(root):
    features, labels = rows()
    table = ImageTable(features.reshape(N, SIDE, SIDE).astype(np.float32), labels, CLASSES)
    write_image_table(table, root / "whole.parquet")
    data = (root / "whole.parquet").read_bytes()
    (root / "cut.parquet").write_bytes(data[: len(data) // 2])
    return IngestParams(source="parquet", path="cut.parquet"), [
        "cut.parquet",
        "not a readable Parquet file",
    ]


def nan_value_csv(root):
    features, labels = rows()
    features[3, 5] = np.nan
    write_csv(root / "nan.csv", features, labels)
    return IngestParams(source="csv", path="nan.csv"), [
        "nan.csv",
        "field 'p5', row 3",
        "missing value",
        "line 5",
    ]


def null_value_parquet(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    features, labels = rows()
    columns = {f"px{i}": pa.array(features[:, i]) for i in range(SIDE * SIDE)}
    columns["px2"] = pa.array([None if r == 6 else v for r, v in enumerate(features[:, 2])])
    columns["label"] = pa.array(labels)
    pq.write_table(pa.table(columns), root / "nulls.parquet")
    return IngestParams(source="parquet", path="nulls.parquet"), [
        "nulls.parquet",
        "field 'px2', row 6",
        "missing value",
    ]


def nan_pixel_npz(root):
    features, labels = rows()
    features[8, 0] = np.inf
    np.savez(root / "inf.npz", x=features.reshape(N, SIDE, SIDE), y=labels)
    return IngestParams(source="npz", path="inf.npz"), ["inf.npz", "field 'x', row 8", "finite"]


def wrong_shape_npz(root):
    features, labels = rows()
    np.savez(root / "shape.npz", x=features.reshape(N, 2, 2, 2, 2), y=labels)
    return IngestParams(source="npz", path="shape.npz"), [
        "shape.npz",
        "field 'x'",
        "(n, c, h, w) or (n, d)",
    ]


def ragged_rows_csv(root):
    write_csv(root / "ragged.csv", *rows())
    lines = (root / "ragged.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0]  # data row 2 loses its last value
    (root / "ragged.csv").write_text("\n".join(lines) + "\n")
    return IngestParams(source="csv", path="ragged.csv"), [
        "ragged.csv",
        "row 2",
        "expected 17 columns, got 16",
    ]


def image_shape_mismatch(root):
    write_csv(root / "flat.csv", *rows())
    return IngestParams(source="csv", path="flat.csv", image_shape=(3, 3)), [
        "flat.csv",
        "field 'image'",
        "image_shape [3, 3] needs 9 values per row, rows have 16",
    ]


def label_out_of_range(root):
    features, labels = rows()
    labels[4] = 7
    write_csv(root / "labels.csv", features, labels)
    return IngestParams(source="csv", path="labels.csv", num_classes=3), [
        "labels.csv",
        "field 'label', row 4",
        "label 7 is outside [0, 3)",
    ]


def negative_label(root):
    features, labels = rows()
    labels[9] = -1
    np.savez(root / "neg.npz", x=features, y=labels)
    return IngestParams(source="npz", path="neg.npz"), [
        "neg.npz",
        "field 'y', row 9",
        "label -1 is outside",
    ]


def missing_label_column(root):
    features, labels = rows()
    write_csv(root / "nolabel.csv", features, labels, ["class", *(f"p{i}" for i in range(16))])
    return IngestParams(source="csv", path="nolabel.csv"), [
        "nolabel.csv",
        "field 'label'",
        "label column missing",
    ]


def unreadable_png(root):
    from PIL import Image

    features, labels = rows()
    for i, (pixels, label) in enumerate(zip(features, labels, strict=True)):
        folder = root / "tree" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels.reshape(SIDE, SIDE).astype(np.uint8), mode="L")
        image.save(folder / f"{i:02d}.png")
    (root / "tree" / "class_1" / "04.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    # sorted files: class_0 holds 4 images (rows 0-3), so class_1/04.png is row 5
    return IngestParams(source="images", path="tree"), [
        "04.png",
        "field 'image', row 5",
        "unreadable image",
    ]


def idx_count_mismatch(root):
    features, labels = rows()
    write_idx(root / "img.idx.gz", features.reshape(N, SIDE, SIDE))
    write_idx(root / "lab.idx.gz", labels[:-1])
    p = IngestParams(source="idx", path="img.idx.gz", labels_path="lab.idx.gz")
    return p, ["lab.idx.gz", "field 'count'", "9 labels but img.idx.gz holds 10 images"]


CASES: list[Callable] = [
    empty_file,
    truncated_parquet,
    nan_value_csv,
    null_value_parquet,
    nan_pixel_npz,
    wrong_shape_npz,
    ragged_rows_csv,
    image_shape_mismatch,
    label_out_of_range,
    negative_label,
    missing_label_column,
    unreadable_png,
    idx_count_mismatch,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_fails_naming_the_place_and_keeps_outputs(workspace, case):
    _, good = run_ingest(workspace, IngestParams(source="csv", path="good.csv"))
    assert good["rows"] == N
    before = snapshot(workspace)
    assert "data/raw/table.parquet" in before and "reports/ingest.json" in before

    p, fragments = case(workspace)
    tracker = None
    with pytest.raises(DataError) as caught:
        with stage_run("ingest", workspace, "lepton") as tracker:
            ingest.run(Params(ingest=p), Paths(workspace), tracker)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message

    assert snapshot(workspace) == before
    leftovers = [
        f.name
        for folder in ("data", "data/raw", "reports")
        for f in (workspace / folder).iterdir()
        if f.name.startswith(".")
    ]
    assert leftovers == []
    assert client(workspace).get_run(tracker.run_id).info.status == "FAILED"


def test_cli_exits_non_zero_and_prints_the_place(workspace, mlflow_uri):
    features, labels = rows()
    labels[2] = 9
    write_csv(workspace / "bad.csv", features, labels)
    config = {"ingest": {"source": "csv", "path": "bad.csv", "num_classes": 3}}
    (workspace / "params.yaml").write_text(yaml.safe_dump(config))
    run_ingest(workspace, IngestParams(source="csv", path="good.csv"))
    before = snapshot(workspace)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEPTON_", "MLFLOW_"))}
    env["MLFLOW_TRACKING_URI"] = mlflow_uri
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "stage", "run", "ingest"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "bad.csv, field 'label', row 2: label 9 is outside [0, 3)" in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(workspace) == before
