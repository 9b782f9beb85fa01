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
from pipelines.quantum.backends import AerSettings, make_circuit_layer
from pipelines.quantum.circuits import build_circuit, circuit_stats, z_observables
from pipelines.quantum.hybrid import (
    AngleEncoder,
    ClassicalHead,
    HybridHead,
    count_trainable,
    feature_scale,
    load_head,
    load_heads,
    predict_logits,
    save_heads,
    train_head,
)
from pipelines.stages.quantum import (
    score_on_aer,
    stratified_subsample,
    train_quantum_heads,
)

D = 12  # feature width of the synthetic sets


def _features(n: int, d: int = D, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(0, 3, (classes, d))
    return (centres[labels] + rng.normal(0, 1, (n, d))).astype(np.float32), labels


def _layer_inputs(n_qubits: int = 2, reps: int = 1, rows: int = 3, seed: int = 0):
    circuit, inputs, weights = build_circuit(n_qubits, reps, "linear")
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, np.pi, (rows, n_qubits))
    initial = rng.uniform(-1, 1, len(weights))
    return circuit, inputs, weights, z_observables(n_qubits), angles, initial


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
    hybrid = HybridHead(D, n_qubits, reps, entanglement, classes)
    classical = ClassicalHead(D, n_qubits, reps, entanglement, classes)
    expected = (D + 1) * n_qubits + n_qubits * (reps + 1) + n_qubits * classes + classes
    assert count_trainable(hybrid) == count_trainable(classical) == expected


def test_torch_circuit_layer_equals_statevector():
    circuit, inputs, weights, observables, angles, initial = _layer_inputs(3, 2)
    layer = make_circuit_layer("torch", circuit, inputs, weights, observables, initial)
    with torch.no_grad():
        got = layer(torch.as_tensor(angles)).numpy()
    for row, sample in enumerate(angles):
        values = dict(zip(inputs, sample, strict=True)) | dict(zip(weights, initial, strict=True))
        state = Statevector(circuit.assign_parameters(values))
        for qubit in range(3):
            label = "".join("Z" if q == qubit else "I" for q in reversed(range(3)))
            assert got[row, qubit] == pytest.approx(
                state.expectation_value(Pauli(label)).real, abs=1e-12
            )


def _forward_backward(layer, angles):
    x = torch.as_tensor(angles).requires_grad_(True)
    out = layer(x)
    (out * torch.arange(1, out.shape[1] + 1, dtype=out.dtype)).sum().backward()
    return (
        out.detach().double().numpy(),
        x.grad.double().numpy(),
        layer.weight.grad.double().numpy(),
    )


def test_backends_agree_on_values_and_gradients():
    circuit, inputs, weights, observables, angles, initial = _layer_inputs(2, 1)
    results = {
        name: _forward_backward(
            make_circuit_layer(name, circuit, inputs, weights, observables, initial), angles
        )
        for name in ("torch", "qiskit-ml", "reference", "aer")
    }
    for name in ("qiskit-ml", "reference", "aer"):
        for got, expected in zip(results[name], results["torch"], strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name)


def test_aer_shot_noise_and_depolarizing_noise_move_the_expectations():
    circuit, inputs, weights, observables, angles, initial = _layer_inputs(2, 1, rows=20)
    exact = make_circuit_layer("torch", circuit, inputs, weights, observables, initial)
    noisy = make_circuit_layer(
        "aer",
        circuit,
        inputs,
        weights,
        observables,
        initial,
        aer=AerSettings(shots=256, depolarizing_1q=0.01, depolarizing_2q=0.1, seed=1),
    )
    with torch.no_grad():
        difference = noisy(torch.as_tensor(angles)).double() - exact(torch.as_tensor(angles))
    assert 0.0 < difference.abs().mean() < 0.5
    assert noisy.circuit_evaluations == 20 * 2


def test_training_step_moves_every_part_with_finite_gradients():
    features, labels = _features(16)
    head = HybridHead(D, 2, 1, "linear", num_classes=3, seed=3)
    head.set_input_map(AngleEncoder.fit(features, 2))
    x, y = torch.from_numpy(features[:8]), torch.from_numpy(labels[:8])
    loss_fn = torch.nn.CrossEntropyLoss()
    loss = loss_fn(head(x), y)
    loss.backward()
    for name, parameter in head.named_parameters():
        gradient = parameter.grad
        assert gradient is not None and torch.isfinite(gradient).all(), name
        assert gradient.abs().sum() > 0, name
    head.zero_grad()

    before = {k: v.detach().clone() for k, v in head.state_dict().items()}
    evaluations = head.circuit_evaluations
    params = QuantumParams(n_qubits=2, reps=1, batch_size=8, epochs=1, learning_rate=0.01)
    history = train_head(head, features, labels, params, seed=0)
    assert len(history) == 2 and all(np.isfinite(row["loss"]) for row in history)
    after = head.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    # the torch backend simulates each row once per observable; its backward is autograd
    assert head.circuit_evaluations - evaluations == 16 * 2


def test_heads_train_deterministically_on_the_same_batches():
    features, labels = _features(24)
    params = QuantumParams(n_qubits=2, reps=1, batch_size=8, epochs=2, learning_rate=0.05)
    runs = []
    for _ in range(2):
        head = ClassicalHead(D, 2, 1, "linear", 3, seed=1)
        runs.append([row["loss"] for row in train_head(head, features, labels, params, seed=5)])
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_angle_encoder_linear_map_reproduces_its_angles():
    features, _ = _features(40)
    encoder = AngleEncoder.fit(features, 3)
    weight, bias = encoder.linear_map()
    unclipped = features.astype(np.float64) @ weight.T + bias
    inside = (unclipped >= 0) & (unclipped <= np.pi)
    assert inside.mean() > 0.9
    np.testing.assert_allclose(encoder.transform(features)[inside], unclipped[inside], atol=1e-5)
    with pytest.raises(ValueError, match="components"):
        AngleEncoder.fit(features[:2], 3)


def test_save_load_gives_identical_logits_on_every_backend(tmp_path: Path):
    features, labels = _features(16)
    encoder = AngleEncoder.fit(features, 2)
    hybrid = HybridHead(D, 2, 1, "linear", 3, seed=2)
    classical = ClassicalHead(D, 2, 1, "linear", 3, seed=2)
    params = QuantumParams(n_qubits=2, reps=1, batch_size=8, epochs=1)
    for head in (hybrid, classical):
        head.set_input_map(encoder)
        train_head(head, features, labels, params, seed=0)
    save_heads(tmp_path, hybrid, classical)
    assert {p.name for p in tmp_path.iterdir()} == {
        "hybrid.safetensors",
        "hybrid.json",
        "classical.safetensors",
        "classical.json",
        "circuit.qpy",
    }
    heads = load_heads(tmp_path)
    np.testing.assert_array_equal(heads["hybrid"](features), predict_logits(hybrid, features))
    np.testing.assert_array_equal(heads["classical"](features), predict_logits(classical, features))
    on_qiskit = load_head(tmp_path, "hybrid", backend="qiskit-ml")
    np.testing.assert_allclose(
        predict_logits(on_qiskit, features), predict_logits(hybrid, features), atol=1e-5
    )


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
    expected = (D + 1) * 2 + 2 * 2 + 2 * 3 + 3
    assert m["trainable_params_hybrid"] == m["trainable_params_classical"] == expected
    assert m["train_rows"] == 8 and m["n_qubits"] == 2 and m["circuit_depth"] > 0
    assert m["circuit_evaluations"] == 8 * 2
    assert m["score_circuit_evaluations"] == (9 + 12) * 2
    for key in ("hybrid_val_accuracy", "hybrid_test_accuracy", "classical_test_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert [r["head"] for r in result.history] == ["hybrid"] * 2 + ["classical"] * 2


def test_heads_learn_a_separable_problem():
    features, labels = _features(180, seed=1)  # one draw of cluster centres for both splits
    train, train_labels, test, test_labels = (
        features[:120],
        labels[:120],
        features[120:],
        labels[120:],
    )
    params = QuantumParams(n_qubits=2, reps=1, batch_size=16, epochs=30, learning_rate=0.02)
    result = train_quantum_heads(
        train, train_labels, test, test_labels, test, test_labels, params, seed=0
    )
    # three well-separated clusters: chance is 1/3; both heads must be well above it
    assert result.metrics["hybrid_test_accuracy"] > 0.6
    assert result.metrics["classical_test_accuracy"] > 0.6


def test_heads_train_alike_whatever_the_scale_of_the_features(tmp_path: Path):
    # embeddings of longer-trained encoders are larger; the heads divide by the features'
    # mean norm, so the same rows 40x larger give the same training (up to rounding)
    features, labels = _features(48, seed=4)
    params = QuantumParams(n_qubits=2, reps=1, batch_size=8, epochs=3, learning_rate=0.05)
    runs = []
    for factor in (1.0, 40.0):
        x = features * factor
        result = train_quantum_heads(x, labels, x, labels, x, labels, params, seed=0)
        assert result.hybrid.input_scale == pytest.approx(feature_scale(x))
        runs.append(result)
    for small, large in zip(runs[0].history, runs[1].history, strict=True):
        assert large["loss"] == pytest.approx(small["loss"], rel=1e-3, abs=1e-4)
    for key in ("hybrid_test_accuracy", "classical_test_accuracy"):
        assert runs[1].metrics[key] == runs[0].metrics[key]
    # the scale travels with the saved head
    save_heads(tmp_path, runs[1].hybrid, runs[1].classical)
    for name, head in (("hybrid", runs[1].hybrid), ("classical", runs[1].classical)):
        loaded = load_head(tmp_path, name)
        assert loaded.input_scale == head.input_scale
        np.testing.assert_allclose(
            predict_logits(loaded, features * 40.0),
            predict_logits(head, features * 40.0),
            atol=1e-5,
        )


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
    assert 0.0 <= report["hybrid_aer_test_accuracy"] <= 1.0
    assert report["aer_circuit_evaluations"] == (6 + 7) * 2
    assert tracker.artifacts == [(out, "quantum")]
    assert tracker.params[0]["circuit"]["n_qubits"] == 2
    assert "epoch_hybrid_train_loss" in tracker.metrics[0][1]

    # The evaluate stage's path (encoder features → load_heads) reproduces the reported score.
    with torch.no_grad():
        features = model.encoder(torch.from_numpy(test.images)).numpy()
    heads = load_heads(out)
    for name in ("hybrid", "classical"):
        logits = heads[name](features)
        assert logits.shape == (7, 3)
        accuracy = float((logits.argmax(1) == test.labels).mean())
        assert accuracy == pytest.approx(report[f"{name}_test_accuracy"])

    # Exact Aer (no shots, no noise) scores like the torch backend.
    exact = QuantumParams(
        n_qubits=2, reps=1, aer_shots=None, aer_depolarizing_1q=0, aer_depolarizing_2q=0
    )
    scored = score_on_aer(out, exact, 0, {"test": (features, test.labels)})
    assert scored["hybrid_aer_test_accuracy"] == pytest.approx(report["hybrid_test_accuracy"])
