"""Hybrid quantum-classical head on the federated encoder's features, beside a classical twin.

Reads the federated classifier (``models/federate``) and the partitions: the union of the
client shards is the training set, ``val.parquet`` and ``test.parquet`` are scored. The
encoder's embeddings (computed on CPU, as the evaluate stage computes them) are mapped to
``n_qubits`` angles by a fixed PCA + scaling fitted on all training features. Then
``quantum.train_samples`` training rows are drawn (stratified, seeded) and two heads are
trained on exactly those rows, in the same order, for the same steps:

- ``hybrid``: a qiskit circuit (ZZ feature map + ``real_amplitudes``) read out as ``<Z_i>``
  through qiskit-machine-learning's ``EstimatorQNN`` (exact statevector) + linear layer;
- ``classical``: a classical block with exactly as many trainable numbers as the circuit's
  weights + the same linear layer.

The report states both accuracies side by side; it claims nothing beyond them.

``circuit_evaluations`` counts circuits the estimator simulated during training: one per
(sample, observable) in a forward pass, and in the backward pass one per (sample,
observable, weight, ±π/2 shift), so a step on ``b`` rows costs
``b · n_qubits · (1 + 2 · n_weights)``. ``score_circuit_evaluations`` counts the forward
passes on val and test (``rows · n_qubits``).

Writes ``models/quantum/{hybrid,classical}.{safetensors,json}``, ``angle_encoder.safetensors``,
``circuit.qpy`` (the trained circuit, weights bound), ``history.csv`` and
``reports/quantum.json``.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import Params, QuantumParams
from pipelines.errors import DataError
from pipelines.io import ImageTable, Paths, atomic_outputs, read_image_table, write_json
from pipelines.tracking import StageTracker

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("head", "epoch", "step", "loss", "samples", "seconds")


@dataclass
class QuantumResult:
    """What :func:`train_quantum_heads` produces: the fitted parts, history and metrics."""

    encoder: Any
    hybrid: Any
    classical: Any
    history: list[dict[str, Any]]
    metrics: dict[str, float]
    circuit_stats: dict[str, int]
    train_index: np.ndarray = field(repr=False)


def stratified_subsample(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` rows whose class mix follows ``labels`` (seeded).

    Each class gets ``size · share`` rows rounded down; the rows left over go to the classes
    with the largest remainders (ties broken at random). ``size >= len(labels)`` keeps all.
    """
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = size * counts / counts.sum()
    take = np.floor(quota).astype(int)
    leftover = size - int(take.sum())
    if leftover:
        tie_break = rng.random(len(classes))
        order = np.lexsort((tie_break, -(quota - take)))
        take[order[:leftover]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=n, replace=False)
        for cls, n in zip(classes, take, strict=True)
        if n
    ]
    return np.sort(np.concatenate(chosen))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose arg-max logit is the label."""
    return (
        float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean()) if len(labels) else 0.0
    )


def train_quantum_heads(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    params: QuantumParams,
    seed: int,
    num_classes: int | None = None,
) -> QuantumResult:
    """Fit the angle encoder, train the hybrid and classical heads alike, score both.

    The encoder is fitted on all training features; both heads train on the same
    ``params.train_samples`` stratified rows with the same seed (same init draws, same
    batches). Pure apart from logging; features are ``(n, d)`` arrays.
    """
    from pipelines.quantum.circuits import circuit_stats
    from pipelines.quantum.hybrid import (
        AngleEncoder,
        ClassicalHead,
        HybridHead,
        count_trainable,
        predict_logits,
        train_head,
    )

    train_labels = np.asarray(train_labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max(), test_labels.max())) + 1
    encoder = AngleEncoder.fit(train_features, params.n_qubits)
    index = stratified_subsample(train_labels, params.train_samples, seed)
    angles = encoder.transform(np.asarray(train_features)[index])
    labels = train_labels[index]
    head_args = (params.n_qubits, params.reps, params.entanglement, num_classes, seed)
    hybrid = HybridHead(*head_args)
    classical = ClassicalHead(*head_args)
    stats = circuit_stats(hybrid.circuit, hybrid.weight_params)
    sizes = {"hybrid": count_trainable(hybrid), "classical": count_trainable(classical)}
    if sizes["hybrid"] != sizes["classical"]:
        raise AssertionError(f"heads differ in trainable parameters: {sizes}")
    log.info(
        "%d training rows of %d, %d qubits, circuit depth %d, %d circuit weights, "
        "%d trainable parameters per head",
        len(index),
        len(train_labels),
        params.n_qubits,
        stats["depth"],
        stats["n_weights"],
        sizes["hybrid"],
    )

    started = time.perf_counter()
    history = train_head(hybrid, angles, labels, params, seed)
    hybrid_seconds = time.perf_counter() - started
    train_evaluations = hybrid.circuit_evaluations
    started = time.perf_counter()
    history += train_head(classical, angles, labels, params, seed)
    classical_seconds = time.perf_counter() - started

    batch = params.batch_size
    started = time.perf_counter()
    val_angles, test_angles = encoder.transform(val_features), encoder.transform(test_features)
    metrics: dict[str, float] = {
        "hybrid_val_accuracy": accuracy(predict_logits(hybrid, val_angles, batch), val_labels),
        "hybrid_test_accuracy": accuracy(predict_logits(hybrid, test_angles, batch), test_labels),
    }
    score_seconds = time.perf_counter() - started
    metrics |= {
        "classical_val_accuracy": accuracy(
            predict_logits(classical, val_angles, batch), val_labels
        ),
        "classical_test_accuracy": accuracy(
            predict_logits(classical, test_angles, batch), test_labels
        ),
        "trainable_params_hybrid": sizes["hybrid"],
        "trainable_params_classical": sizes["classical"],
        "n_qubits": params.n_qubits,
        "circuit_depth": stats["depth"],
        "circuit_weights": stats["n_weights"],
        "circuit_evaluations": train_evaluations,
        "score_circuit_evaluations": hybrid.circuit_evaluations - train_evaluations,
        "train_rows": len(index),
        "train_seconds": hybrid_seconds,
        "samples_per_s": len(index) * params.epochs / hybrid_seconds,
        "classical_train_seconds": classical_seconds,
        "score_seconds": score_seconds,
    }
    for name in ("hybrid", "classical"):
        last = [row["loss"] for row in history if row["head"] == name][-1]
        metrics[f"{name}_train_loss"] = last
    return QuantumResult(encoder, hybrid, classical, history, metrics, stats, index)


def epoch_losses(history: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """``{epoch: {"<head>_train_loss": mean loss of its steps}}`` from the step history."""
    sums: dict[int, dict[str, list[float]]] = {}
    for row in history:
        sums.setdefault(int(row["epoch"]), {}).setdefault(row["head"], []).append(row["loss"])
    return {
        epoch: {f"{head}_train_loss": float(np.mean(losses)) for head, losses in heads.items()}
        for epoch, heads in sums.items()
    }


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """One CSV row per training step of either head."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow(
                {**row, "loss": f"{row['loss']:.6f}", "seconds": f"{row['seconds']:.4f}"}
            )


def encoder_features(encoder, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Embeddings ``(n, d)`` float32 of images ``(n, h, w)`` on CPU, eval mode, no gradients."""
    import torch

    encoder = encoder.eval().cpu()
    parts = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size, None]))
            parts.append(encoder(x.float()).numpy())
    if not parts:
        return np.zeros((0, getattr(encoder, "embedding_dim", 0)), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def read_training_union(partitions: Path) -> ImageTable:
    """All client shards ``clients/client_*.parquet`` (name order) as one table."""
    shards = sorted((partitions / "clients").glob("client_*.parquet"))
    if not shards:
        raise DataError(str(partitions / "clients"), "no client shards (has partition run?)")
    tables = [read_image_table(path) for path in shards]
    return ImageTable(
        np.concatenate([t.images for t in tables]),
        np.concatenate([t.labels for t in tables]),
        max(t.num_classes for t in tables),
    )


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Train both heads on the federated encoder's features; write models/quantum + report."""
    from qiskit import qpy

    from pipelines.models.encoder import load_classifier
    from pipelines.quantum.hybrid import save_heads

    logging.getLogger("qiskit").setLevel(logging.WARNING)  # per-pass transpiler chatter
    p = params.quantum
    seed = params.common.seed
    classifier = load_classifier(paths.model_dir("federate"))
    train = read_training_union(paths.partitions)
    val = read_image_table(paths.partitions / "val.parquet")
    test = read_image_table(paths.partitions / "test.parquet")
    num_classes = max(train.num_classes, val.num_classes, test.num_classes)
    log.info("features of %d train, %d val, %d test images", len(train), len(val), len(test))
    result = train_quantum_heads(
        encoder_features(classifier.encoder, train.images),
        train.labels,
        encoder_features(classifier.encoder, val.images),
        val.labels,
        encoder_features(classifier.encoder, test.images),
        test.labels,
        p,
        seed,
        num_classes,
    )
    metrics = result.metrics
    log.info(
        "val accuracy: hybrid %.4f, classical %.4f; test accuracy: hybrid %.4f, classical %.4f "
        "(%d trainable parameters each; %d circuit evaluations in %.1f s of training)",
        metrics["hybrid_val_accuracy"],
        metrics["classical_val_accuracy"],
        metrics["hybrid_test_accuracy"],
        metrics["classical_test_accuracy"],
        metrics["trainable_params_hybrid"],
        metrics["circuit_evaluations"],
        metrics["train_seconds"],
    )

    out = paths.model_dir("quantum")
    with atomic_outputs(dirs=[out], files=[paths.report("quantum")]) as staged:
        save_heads(staged.path(out), result.encoder, result.hybrid, result.classical)
        write_history(staged.path(out) / "history.csv", result.history)
        write_json(staged.path(paths.report("quantum")), metrics)
        with (staged.path(out) / "circuit.qpy").open("rb") as handle:
            (reloaded,) = qpy.load(handle)
        if reloaded.num_qubits != p.n_qubits:  # never commit a circuit that does not load
            raise DataError(str(out / "circuit.qpy"), "written circuit does not load back")

    # The CLI logs params.quantum and the returned metrics; add what only this stage knows.
    tracker.log_params({"circuit": result.circuit_stats, "train_rows": len(result.train_index)})
    for epoch, losses in sorted(epoch_losses(result.history).items()):
        tracker.log_metrics(losses, step=epoch)
    tracker.log_artifact(out, "quantum")
    return metrics
