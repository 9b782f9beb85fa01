"""register logs a winning hybrid head as an MLflow model from code, loadable by pyfunc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import Params, RegisterParams
from pipelines.io import ImageTable, Paths, save_weights, write_image_table, write_json
from pipelines.models.encoder import build_classifier, classifier_config, encoder_config
from pipelines.quantum.hybrid import AngleEncoder, ClassicalHead, HybridHead, save_heads
from pipelines.quantum.pyfunc_model import hybrid_logits
from pipelines.stages import register
from pipelines.tracking import client, stage_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def test_hybrid_variant_is_registered_and_predicts_like_the_head(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LEPTON_PIPELINE_RUN", "test-register-hybrid")
    paths = Paths(tmp_path)
    rng = np.random.default_rng(0)
    test = ImageTable(rng.random((12, 8, 8), dtype=np.float32), np.arange(12) % 3, 3)
    paths.partitions.mkdir(parents=True)
    write_image_table(test, paths.partitions / "test.parquet")
    paths.raw.mkdir(parents=True)
    write_json(paths.raw / "manifest.json", {"content_sha256": "abc123"})

    torch.manual_seed(0)
    model = build_classifier(classifier_config(encoder_config(8, (4, 8), groups=2), 3)).eval()
    paths.model_dir("federate").mkdir(parents=True)
    save_weights(model, paths.model_dir("federate"), model.config, name="model")
    with torch.no_grad():
        features = model.encoder(torch.from_numpy(test.images)).numpy()
    hybrid = HybridHead(features.shape[1], 2, 1, "linear", 3, seed=1)
    classical = ClassicalHead(features.shape[1], 2, 1, "linear", 3, seed=1)
    for head in (hybrid, classical):
        head.set_input_map(AngleEncoder.fit(features, 2))
    paths.model_dir("quantum").mkdir(parents=True)
    save_heads(paths.model_dir("quantum"), hybrid, classical)
    paths.report("evaluate").parent.mkdir(parents=True)
    write_json(paths.report("federate"), {"dp": 0, "val_accuracy": 0.5})
    hybrid_scores = {"test_accuracy": 0.5, "test_macro_f1": 0.4, "val_accuracy": 0.5}
    write_json(
        paths.report("evaluate"),
        {
            "chosen_variant": "quantum_hybrid",
            "test_accuracy": 0.5,
            "val_accuracy": 0.5,
            "variants": {"quantum_hybrid": hybrid_scores},
        },
    )
    write_json(paths.report("optimize"), {"variants": {}})

    params = Params(register=RegisterParams(model_name="hybrid-test", accuracy_floor=0.9))
    with stage_run("register", tmp_path, "lepton") as tracker:
        result = register.run(params, paths, tracker)
    assert result["version"] == 1 and result["promoted"] == 0  # 0.5 is below the floor
    report = json.loads(paths.report("register").read_text())
    assert report["variant"] == "quantum_hybrid"

    import mlflow

    mlflow_client = client(tmp_path)
    version = mlflow_client.get_model_version_by_alias("hybrid-test", "candidate")
    assert version.tags["variant"] == "quantum_hybrid"
    assert version.tags["lepton.data_sha256"] == "abc123"
    loaded = mlflow.pyfunc.load_model("models:/hybrid-test@candidate")
    answer = loaded.predict(test.images)
    expected = hybrid_logits(model.encoder, hybrid, test.images)
    np.testing.assert_allclose(answer["logits"], expected, atol=1e-5)
    np.testing.assert_array_equal(answer["label"], expected.argmax(1))
    np.testing.assert_allclose(answer["probabilities"].sum(1), 1.0, atol=1e-5)
    # the description is a model card
    described = mlflow_client.get_model_version("hybrid-test", version.version).description
    assert "quantum_hybrid" in described and "abc123" in described and "0.5000" in described
    # nothing in the logged model is a pickle: weights are safetensors, the model is code
    local = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "dl")))
    files = [p.name for p in local.rglob("*") if p.is_file()]
    assert "hybrid.safetensors" in files and "model.safetensors" in files
    assert not [name for name in files if name.endswith((".pkl", ".pickle"))]
