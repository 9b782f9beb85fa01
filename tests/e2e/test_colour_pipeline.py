"""A small RGB set through the whole pipeline (`lepton run --via dvc`: `dvc repro` with the
stages forked from a warm stage runner), and the registered model loaded back with
`mlflow.pyfunc` predicting on RGB input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.examples import coloured_digits, write_class_folders
from tests.conftest import BIN, TINY_OVERRIDES, make_workspace
from tests.e2e.test_pipeline import run

pytestmark = pytest.mark.slow


def test_rgb_class_folders_run_end_to_end_and_serve_rgb(tmp_path: Path):
    images, labels = coloured_digits(side=16, seed=1)
    keep = np.arange(len(labels)) % 2 == 0  # half the digits: a smaller, faster set
    write_class_folders(tmp_path / "rgb", images[keep], labels[keep])
    overrides = {k: dict(v) for k, v in TINY_OVERRIDES.items()}
    overrides["ingest"] = {"source": "images", "path": str(tmp_path / "rgb")}
    overrides["register"] = {"accuracy_floor": 0.0}
    # colour digits need more steps than the tiny grayscale runs to leave chance
    overrides["federate"] = {"rounds": 6, "local_epochs": 2}
    root = make_workspace(tmp_path / "ws", overrides)
    # `dvc repro`, its stages forked from the run's warm stage runner
    done = run([str(BIN / "lepton"), "run", "--via", "dvc"], root, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    manifest = json.loads((root / "data/raw/manifest.json").read_text())
    assert manifest["channels"] == 3 and manifest["image_shape"] == [16, 16]
    encoder = json.loads((root / "models/pretrain/encoder.json").read_text())
    assert encoder["in_channels"] == 3 and encoder["stem"] == [16]
    model = json.loads((root / "models/federate/model.json").read_text())
    assert model["encoder"]["in_channels"] == 3
    assert json.loads((root / "models/optimize/manifest.json").read_text())["channels"] == 3
    metrics = json.loads((root / "reports/metrics.json").read_text())
    # 6 short rounds on 900 small colour digits: well above chance (0.1), far from done
    assert metrics["variants"]["federated"]["test_accuracy"] > 0.2

    import mlflow

    from pipelines.io import read_image_table

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/lepton-digits@candidate")
    test = read_image_table(root / "data/partitions/test.parquet")
    assert test.images.shape[1:] == (3, 16, 16)
    output = loaded.predict(test.images)
    # an ONNX variant answers {output name: array}, the hybrid head an array
    logits = np.asarray(output["logits"] if isinstance(output, dict) else output)
    assert logits.shape == (len(test), 10)
    # the served model is the one evaluate scored: same accuracy on the same rows
    served = float((logits.argmax(1) == test.labels).mean())
    assert served == pytest.approx(metrics["test_accuracy"], abs=1e-9)

    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="shape"):  # grayscale does not fit the signature
        loaded.predict(test.images[:4, :1])
