"""Quantum stage: circuit, QNN wiring against qiskit's Statevector, equal-size heads,
training steps, save/load, subsampling, and the stage's run() on a tiny workspace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from qiskit.quantum_info import Pauli, Statevector

from pipelines.config import Params, QuantumParams
from pipelines.io import ImageTable, Paths, save_weights, write_image_table
from pipelines.quantum.circuits import build_circuit, circuit_stats, z_observables
from pipelines.quantum.hybrid import (
    AngleEncoder,
    ClassicalHead,
    HybridHead,
    count_trainable,
    load_heads,
    predict_logits,
    save_heads,
    train_head,
)
from pipelines.stages.quantum import (
    stratified_subsample,
    train_quantum_heads,
)


def _features(n: int, d: int = 12, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(0, 3, (classes, d))
    return (centres[labels] + rng.normal(0, 1, (n, d))).astype(np.float32), labels


@pytest.mark.parametrize("n_qubits", [2, 3, 4])
@pytest.mark.parametrize("reps", [1, 2])
def test_circuit_has_qubits_inputs_and_weights(n_qubits, reps):
    circuit, inputs, weights = build_circuit(n_qubits, reps, "linear")
    assert circuit.num_qubits == n_qubits
    assert len(inputs) == n_qubits
    assert len(weights) == n_qubits * (reps + 1)
    assert set(circuit.parameters) == set(inputs) | set(weights)
    stats = circuit_stats(circuit, weights)
    assert stats["n_qubits"] == n_qubits
    assert stats["n_weights"] == len(weights)
    assert stats["depth"] > reps
    observables = z_observables(n_qubits)
    assert [op.paulis[0].to_label() for op in observables][0] == "I" * (n_qubits - 1) + "Z"


@pytest.mark.parametrize(
    "n_qubits, reps, entanglement, classes",
    [(1, 1, "linear", 2), (2, 1, "linear", 3), (3, 2, "full", 10), (4, 2, "circular", 5)],
)
def test_heads_have_equal_trainable_parameters(n_qubits, reps, entanglement, classes):
    hybrid = HybridHead(n_qubits, reps, entanglement, classes)
    classical = ClassicalHead(n_qubits, reps, entanglement, classes)
    expected = n_qubits * (reps + 1) + n_qubits * classes + classes
    assert count_trainable(hybrid) == count_trainable(classical) == expected


def test_hybrid_expectations_equal_statevector():
    n_qubits = 3
    head = HybridHead(n_qubits, 2, "linear", num_classes=4, seed=7)
    angles = np.array([[0.3, 1.2, 2.9], [3.0, 0.1, 1.7]], dtype=np.float32)
    with torch.no_grad():
        got = head.expectations(torch.from_numpy(angles)).numpy()
    weights = head.qnn.weight.detach().numpy().astype(np.float64)
    for row, sample in enumerate(angles.astype(np.float64)):
        values = dict(zip(head.input_params, sample, strict=True))
        values |= dict(zip(head.weight_params, weights, strict=True))
        state = Statevector(head.circuit.assign_parameters(values))
        for qubit in range(n_qubits):
            label = "".join("Z" if q == qubit else "I" for q in reversed(range(n_qubits)))
            expected = state.expectation_value(Pauli(label)).real
            assert got[row, qubit] == pytest.approx(expected, abs=1e-6)


def test_training_step_moves_weights_with_finite_gradients():
    rng = np.random.default_rng(0)
    angles = rng.uniform(0, np.pi, (8, 2)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    head = HybridHead(2, 1, "linear", num_classes=3, seed=3)
    x, y = torch.from_numpy(angles), torch.from_numpy(labels)
    loss_fn = torch.nn.CrossEntropyLoss()
    before = head.qnn.weight.detach().clone()
    loss = loss_fn(head(x), y)
    loss.backward()
    gradient = head.qnn.weight.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    head.zero_grad()

    evaluations = head.circuit_evaluations
    params = QuantumParams(n_qubits=2, reps=1, batch_size=8, epochs=1, learning_rate=0.05)
    history = train_head(head, angles, labels, params, seed=0)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    assert not torch.equal(head.qnn.weight.detach(), before)
    # One step on 8 rows, 2 observables: 1 forward + 2 shifts for each of 4 weights.
    assert head.circuit_evaluations - evaluations == 8 * 2 * (1 + 2 * 4)
    with torch.no_grad():
        assert loss_fn(head(x), y).item() < loss.item()


def test_classical_head_trains_on_the_same_batches():
    features, labels = _features(24)
    angles = AngleEncoder.fit(features, 2).transform(features)
    params = QuantumParams(n_qubits=2, reps=1, batch_size=8, epochs=2, learning_rate=0.05)
    head = ClassicalHead(2, 1, "linear", 3, seed=1)
    history = train_head(head, angles, labels, params, seed=5)
    again = train_head(ClassicalHead(2, 1, "linear", 3, seed=1), angles, labels, params, seed=5)
    assert [r["loss"] for r in history] == [r["loss"] for r in again]
    assert len(history) == 6 and history[-1]["epoch"] == 1


def test_angle_encoder_range_and_round_trip(tmp_path: Path):
    features, _ = _features(40)
    encoder = AngleEncoder.fit(features, 3)
    angles = encoder.transform(features * 5)  # far outside the fitted range: clipped
    assert angles.shape == (40, 3) and angles.min() >= 0 and angles.max() <= np.pi + 1e-6
    encoder.save(tmp_path / "enc.safetensors")
    loaded = AngleEncoder.load(tmp_path / "enc.safetensors")
    np.testing.assert_array_equal(loaded.transform(features), encoder.transform(features))
    with pytest.raises(ValueError, match="components"):
        AngleEncoder.fit(features[:2], 3)


def test_save_load_gives_identical_logits(tmp_path: Path):
    features, labels = _features(16)
    encoder = AngleEncoder.fit(features, 2)
    hybrid = HybridHead(2, 1, "linear", 3, seed=2)
    classical = ClassicalHead(2, 1, "linear", 3, seed=2)
    params = QuantumParams(n_qubits=2, reps=1, batch_size=8, epochs=1)
    angles = encoder.transform(features)
    train_head(hybrid, angles, labels, params, seed=0)
    train_head(classical, angles, labels, params, seed=0)
    save_heads(tmp_path, encoder, hybrid, classical)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "hybrid.safetensors",
        "hybrid.json",
        "classical.safetensors",
        "classical.json",
        "angle_encoder.safetensors",
        "circuit.qpy",
    }
    heads = load_heads(tmp_path)
    np.testing.assert_array_equal(heads["hybrid"](features), predict_logits(hybrid, angles))
    np.testing.assert_array_equal(heads["classical"](features), predict_logits(classical, angles))


def test_stratified_subsample_follows_the_class_mix():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    index = stratified_subsample(labels, 20, seed=1)
    assert len(index) == len(set(index)) == 20
    assert np.bincount(labels[index]).tolist() == [12, 6, 2]
    np.testing.assert_array_equal(index, stratified_subsample(labels, 20, seed=1))
    assert len(stratified_subsample(np.arange(10) % 10, 4, seed=0)) == 4  # fewer than classes
    assert len(stratified_subsample(labels, 500, seed=0)) == 100


def test_train_quantum_heads_reports_both_heads():
    train, train_labels = _features(40, seed=1)
    val, val_labels = _features(9, seed=2)
    test, test_labels = _features(12, seed=3)
    params = QuantumParams(n_qubits=2, reps=1, train_samples=8, batch_size=4, epochs=1)
    result = train_quantum_heads(
        train, train_labels, val, val_labels, test, test_labels, params, seed=0
    )
    m = result.metrics
    assert m["trainable_params_hybrid"] == m["trainable_params_classical"] == 2 * 2 + 2 * 3 + 3
    assert m["train_rows"] == 8 and m["n_qubits"] == 2 and m["circuit_depth"] > 0
    assert m["circuit_evaluations"] == 8 * 2 * (1 + 2 * 4)
    assert m["score_circuit_evaluations"] == (9 + 12) * 2
    for key in ("hybrid_val_accuracy", "hybrid_test_accuracy", "classical_test_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert [r["head"] for r in result.history] == ["hybrid"] * 2 + ["classical"] * 2


class _Tracker:
    def __init__(self):
        self.metrics, self.params, self.artifacts = [], [], []

    def log_metrics(self, metrics, step=0):
        self.metrics.append((step, dict(metrics)))

    def log_params(self, params):
        self.params.append(params)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path), artifact_path))


def test_run_writes_outputs_that_evaluate_can_load(tmp_path: Path):
    from pipelines.models.encoder import build_classifier, classifier_config, encoder_config
    from pipelines.stages import quantum

    rng = np.random.default_rng(0)
    paths = Paths(tmp_path)
    (paths.partitions / "clients").mkdir(parents=True)

    def table(n):
        return ImageTable(rng.random((n, 8, 8), dtype=np.float32), np.arange(n) % 3, 3)

    write_image_table(table(10), paths.partitions / "clients" / "client_0.parquet")
    write_image_table(table(8), paths.partitions / "clients" / "client_1.parquet")
    write_image_table(table(6), paths.partitions / "val.parquet")
    test = table(7)
    write_image_table(test, paths.partitions / "test.parquet")
    torch.manual_seed(0)
    model = build_classifier(classifier_config(encoder_config(8, (4, 8), groups=2), 3))
    paths.model_dir("federate").mkdir(parents=True)
    save_weights(model, paths.model_dir("federate"), model.config, name="model")

    params = Params(quantum=QuantumParams(n_qubits=2, reps=1, train_samples=8, batch_size=8))
    tracker = _Tracker()
    metrics = quantum.run(params, paths, tracker)

    out = paths.model_dir("quantum")
    assert (out / "history.csv").read_text().startswith("head,epoch,step,loss")
    report = json.loads(paths.report("quantum").read_text())
    assert report["trainable_params_hybrid"] == report["trainable_params_classical"]
    assert report == pytest.approx(metrics)
    assert tracker.artifacts == [(out, "quantum")]
    assert tracker.params[0]["circuit"]["n_qubits"] == 2
    assert "hybrid_train_loss" in tracker.metrics[0][1]

    # The evaluate stage's path (encoder features → load_heads) reproduces the reported score.
    with torch.no_grad():
        features = model.encoder(torch.from_numpy(test.images[:, None])).numpy()
    heads = load_heads(out)
    for name in ("hybrid", "classical"):
        logits = heads[name](features)
        assert logits.shape == (7, 3)
        accuracy = float((logits.argmax(1) == test.labels).mean())
        assert accuracy == pytest.approx(report[f"{name}_test_accuracy"])
