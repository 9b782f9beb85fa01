"""Compression that keeps the model: static int8, structured pruning, distillation, and the
ONNX files' label and probability outputs (pipelines/models/compression.py, onnx_export.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.io import load_weights, save_weights
from pipelines.models.compression import (
    DistillSettings,
    conv_widths,
    distill,
    parameter_count,
    prune_classifier,
    student_classifier,
)
from pipelines.models.encoder import build_classifier, classifier_config, encoder_config_for
from pipelines.models.onnx_export import (
    INPUT_NAME,
    LABEL_NAME,
    PROBABILITIES_NAME,
    add_label_outputs,
    export_onnx,
    interleaved_latency_ms,
    onnx_logits,
    onnx_session,
    quantize_static_int8,
)
from pipelines.models.probes import predict_logits

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits in [0, 1]: (train images, train labels, test images, test labels)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1400], order[1400:]
    return images[train], data.target[train], images[test], data.target[test]


@pytest.fixture(scope="module")
def teacher(digits):
    """The default 8x8 classifier trained on 1400 labeled rows (GroupNorm, as federate's)."""
    images, labels, _, _ = digits
    torch.manual_seed(0)
    model = build_classifier(classifier_config(encoder_config_for((8, 8), 1), 10))
    distill(model, None, images, DistillSettings(epochs=20, batch_size=64), seed=0, labels=labels)
    return model


def accuracy(model, images, labels) -> float:
    return float((predict_logits(model, images).argmax(1) == labels).mean())


def test_the_teacher_learns(teacher, digits):
    assert accuracy(teacher, digits[2], digits[3]) > 0.95


def test_static_int8_agrees_with_fp32_and_answers_labels_and_probabilities(
    teacher, digits, tmp_path
):
    train_images, _, test_images, _ = digits
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    export_onnx(teacher, (8, 8), fp32, 17)
    quantize_static_int8(fp32, int8, train_images[:128], "minmax")
    for path in (fp32, int8):
        add_label_outputs(path)
    reference = onnx_logits(onnx_session(fp32), test_images).argmax(1)
    quantized = onnx_logits(onnx_session(int8), test_images).argmax(1)
    assert (quantized == reference).mean() >= 0.99
    assert int8.stat().st_size < fp32.stat().st_size / 2.5  # int8 weights, fp32 was 4 bytes
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "ConvInteger" not in ops
    session = onnx_session(int8)
    logits, probabilities, label = session.run(
        None, {INPUT_NAME: np.ascontiguousarray(test_images[:7])}
    )
    assert [o.name for o in session.get_outputs()][1:] == [PROBABILITIES_NAME, LABEL_NAME]
    np.testing.assert_array_equal(label, logits.argmax(1))
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_static_int8_refuses_an_unknown_calibration_method(teacher, digits, tmp_path):
    export_onnx(teacher, (8, 8), tmp_path / "m.onnx", 17)
    with pytest.raises(ValueError, match="calibration method"):
        quantize_static_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", digits[0][:8], "max")


def test_pruning_removes_channels_and_the_model_reloads_from_its_config(teacher, digits, tmp_path):
    pruned = prune_classifier(teacher, 0.5, (8, 8))
    assert parameter_count(pruned) < parameter_count(teacher) / 3
    assert conv_widths(pruned) == [w // 2 for w in conv_widths(teacher)]
    assert pruned.config["encoder"]["channels"] == conv_widths(pruned)
    # saved and rebuilt from safetensors + config, it computes the same function
    save_weights(pruned, tmp_path, pruned.config, "pruned")
    state, config = load_weights(tmp_path, "pruned")
    rebuilt = build_classifier(config)
    rebuilt.load_state_dict(state)
    np.testing.assert_allclose(
        predict_logits(rebuilt.eval(), digits[2]), predict_logits(pruned, digits[2]), atol=1e-5
    )
    export_onnx(teacher, (8, 8), tmp_path / "teacher.onnx", 17)
    export_onnx(pruned, (8, 8), tmp_path / "pruned.onnx", 17)
    assert (tmp_path / "pruned.onnx").stat().st_size < (
        tmp_path / "teacher.onnx"
    ).stat().st_size / 3
    assert json.loads((tmp_path / "pruned.json").read_text())["kind"] == "classifier"


def test_pruning_leaves_the_teacher_unchanged(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    prune_classifier(teacher, 0.25, (8, 8))
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_distilled_student_beats_the_same_student_without_the_teacher(teacher, digits):
    """The server's situation: few labeled rows of its own, many unlabeled ones. Without the
    teacher the student learns from the 150 labeled rows; with it, from the teacher's
    predictions on 1400 unlabeled rows. Equal steps: 56 epochs x 3 batches of 50 against
    6 epochs x 28 batches of 50."""
    train_images, train_labels, test_images, test_labels = digits
    alone = student_classifier(teacher, 0.5, seed=3)
    distill(
        alone,
        None,
        train_images[:150],
        DistillSettings(epochs=56, batch_size=50),
        seed=3,
        labels=train_labels[:150],
    )
    taught = student_classifier(teacher, 0.5, seed=3)
    distill(taught, teacher, train_images, DistillSettings(epochs=6, batch_size=50), seed=3)
    assert parameter_count(taught) < parameter_count(teacher) / 3
    scores = accuracy(alone, test_images, test_labels), accuracy(taught, test_images, test_labels)
    assert scores[1] > scores[0] + 0.02, scores


def test_student_is_narrower_with_batch_norm(teacher):
    student = student_classifier(teacher, 0.5, seed=0)
    assert student.config["encoder"]["norm"] == "batch"
    assert conv_widths(student) == [w // 2 for w in conv_widths(teacher)]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in student.modules())
    with pytest.raises(ValueError, match="width"):
        student_classifier(teacher, 0.0, seed=0)


def test_interleaved_latency_measures_every_predictor():
    calls = []
    times = interleaved_latency_ms(
        {"a": lambda x: calls.append(("a", len(x))), "b": lambda x: calls.append(("b", len(x)))},
        np.zeros((3, 1, 8, 8), np.float32),
        batch_size=7,
        repeats=4,
    )
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    # one warm-up each, then turns: a, b, a, b, ... on batches of 7 rows
    assert [name for name, _ in calls[2:]] == ["a", "b"] * 4
    assert {rows for _, rows in calls} == {7}


def test_a_scattering_teacher_gets_a_cnn_student():
    from pipelines.models.compression import has_cnn_encoder
    from pipelines.models.encoder import Classifier
    from pipelines.models.scattering import build_scattering, scattering_config

    teacher = Classifier(build_scattering(scattering_config((8, 8), 1, 1, 8)), 10).eval()
    assert not has_cnn_encoder(teacher)
    student = student_classifier(teacher, 0.5, seed=0, image_shape=(8, 8))
    assert student.config["encoder"]["channels"] == [16, 32, 64]
    assert student(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="image shape"):
        student_classifier(teacher, 0.5, seed=0)
