"""Hybrid quantum-classical head on the federated encoder's features, beside a classical twin.

Reads the federated classifier (``models/federate``) and the partitions: the union of the
client shards is the training set, ``val.parquet`` and ``test.parquet`` are scored. Both
heads read the encoder's embeddings (computed on CPU, as the evaluate stage computes them)
through a learned ``Linear(d, n_qubits)`` input map that starts at the same PCA-to-angles
map, and train on the same rows (``quantum.train_samples``, stratified and seeded; null =
all), in the same order, for the same steps:

- ``hybrid``: the angles drive a qiskit circuit (ZZ feature map + ``real_amplitudes``) read
  out as ``<Z_i>``, then a linear layer; simulated on ``quantum.backend`` (default
  ``torch``: batched exact statevector in torch, see :mod:`pipelines.quantum.backends`);
- ``classical``: a classical block with exactly as many trainable numbers as the circuit's
  weights, then the same linear layer.

The report states both accuracies side by side; it claims nothing beyond them. With
``quantum.score_on_aer`` the trained hybrid head is also scored on qiskit-aer with shot
noise and depolarizing noise (``hybrid_aer_*`` metrics), as hardware would see it.

``circuit_evaluations`` counts circuit results computed in training (one per row and
observable; with parameter shift, every shifted circuit too; the torch backend's backward
is autograd and adds none). ``samples_per_s`` is training rows × epochs per second of
hybrid training.

Writes ``models/quantum/{hybrid,classical}.{safetensors,json}``, ``circuit.qpy`` (the trained
circuit, ansatz weights bound), ``history.csv`` and ``reports/quantum.json``.
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
from pipelines.io import (
    Paths,
    atomic_outputs,
    concat_tables,
    read_client_shards,
    read_image_table,
    write_json,
)
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
    device: str = "cpu",
) -> QuantumResult:
    """Train the hybrid and classical heads alike on the same rows, score both.

    The input maps read the features divided by their mean training norm and start from a
    PCA fitted on all training features; both heads train on the same
    ``params.train_samples`` stratified rows (all when null) with the same seed (same init
    draws, same batches). Pure apart from logging; features are ``(n, d)``.
    """
    import torch

    from pipelines.models.devices import resolve_accelerator
    from pipelines.quantum.circuits import circuit_stats
    from pipelines.quantum.hybrid import (
        AngleEncoder,
        ClassicalHead,
        HybridHead,
        count_trainable,
        feature_scale,
        predict_logits,
        train_head,
    )

    train_features = np.asarray(train_features, dtype=np.float32)
    train_labels = np.asarray(train_labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max(), test_labels.max())) + 1
    torch_device = torch.device(resolve_accelerator(device)) if params.backend == "torch" else None
    encoder = AngleEncoder.fit(train_features, params.n_qubits)
    size = params.train_samples or len(train_labels)
    index = stratified_subsample(train_labels, size, seed)
    rows, labels = train_features[index], train_labels[index]
    shape = (train_features.shape[1], params.n_qubits, params.reps, params.entanglement)
    scale = feature_scale(train_features)
    hybrid = HybridHead(
        *shape,
        num_classes,
        seed,
        backend=params.backend,
        device=torch_device,
        input_scale=scale,
    )
    classical = ClassicalHead(*shape, num_classes, seed, device=torch_device, input_scale=scale)
    for head in (hybrid, classical):
        head.set_input_map(encoder)
    stats = circuit_stats(hybrid.circuit, hybrid.weight_params)
    sizes = {"hybrid": count_trainable(hybrid), "classical": count_trainable(classical)}
    if sizes["hybrid"] != sizes["classical"]:
        raise AssertionError(f"heads differ in trainable parameters: {sizes}")
    log.info(
        "%d training rows of %d, %d qubits, circuit depth %d, %d circuit weights, "
        "%d trainable parameters per head, backend %s on %s",
        len(index),
        len(train_labels),
        params.n_qubits,
        stats["depth"],
        stats["n_weights"],
        sizes["hybrid"],
        params.backend,
        torch_device or "cpu",
    )

    started = time.perf_counter()
    history = train_head(hybrid, rows, labels, params, seed)
    hybrid_seconds = time.perf_counter() - started
    train_evaluations = hybrid.circuit_evaluations
    started = time.perf_counter()
    history += train_head(classical, rows, labels, params, seed)
    classical_seconds = time.perf_counter() - started

    started = time.perf_counter()
    metrics: dict[str, float] = {
        "hybrid_val_accuracy": accuracy(predict_logits(hybrid, val_features), val_labels),
        "hybrid_test_accuracy": accuracy(predict_logits(hybrid, test_features), test_labels),
    }
    score_seconds = time.perf_counter() - started
    metrics |= {
        "classical_val_accuracy": accuracy(predict_logits(classical, val_features), val_labels),
        "classical_test_accuracy": accuracy(predict_logits(classical, test_features), test_labels),
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


def score_on_aer(
    directory: Path,
    params: QuantumParams,
    seed: int,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, float]:
    """Accuracy of the saved hybrid head on qiskit-aer (shots and noise from ``params``).

    ``splits`` maps a split name to ``(features, labels)``; returns ``hybrid_aer_<split>_
    accuracy`` per split, the seconds it took and the circuit results Aer computed.
    """
    from pipelines.quantum.backends import AerSettings
    from pipelines.quantum.hybrid import load_head, predict_logits

    settings = AerSettings(
        shots=params.aer_shots,
        depolarizing_1q=params.aer_depolarizing_1q,
        depolarizing_2q=params.aer_depolarizing_2q,
        seed=seed,
    )
    head = load_head(directory, "hybrid", backend="aer", aer=settings)
    started = time.perf_counter()
    metrics = {
        f"hybrid_aer_{split}_accuracy": accuracy(predict_logits(head, features), labels)
        for split, (features, labels) in splits.items()
    }
    metrics["aer_score_seconds"] = time.perf_counter() - started
    metrics["aer_circuit_evaluations"] = head.circuit_evaluations
    return metrics


def epoch_losses(history: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """``{epoch: {"epoch_<head>_train_loss": mean loss of its steps}}`` from the step history.

    Named apart from the report's ``<head>_train_loss`` (the last step's loss), so MLflow
    holds one meaning per key.
    """
    sums: dict[int, dict[str, list[float]]] = {}
    for row in history:
        sums.setdefault(int(row["epoch"]), {}).setdefault(row["head"], []).append(row["loss"])
    return {
        epoch: {f"epoch_{head}_train_loss": float(np.mean(loss)) for head, loss in heads.items()}
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


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Train both heads on the federated encoder's features; write models/quantum + report."""
    from qiskit import qpy

    from pipelines.models.encoder import load_classifier
    from pipelines.models.probes import extract_features
    from pipelines.quantum.hybrid import save_heads

    logging.getLogger("qiskit").setLevel(logging.WARNING)  # per-pass transpiler chatter
    p = params.quantum
    seed = params.common.seed
    classifier = load_classifier(paths.model_dir("federate"))
    train = concat_tables([table for _, table in read_client_shards(paths.partitions)])
    val = read_image_table(paths.partitions / "val.parquet")
    test = read_image_table(paths.partitions / "test.parquet")
    num_classes = max(train.num_classes, val.num_classes, test.num_classes)
    log.info("features of %d train, %d val, %d test images", len(train), len(val), len(test))
    val_features = extract_features(classifier.encoder, val.images)
    test_features = extract_features(classifier.encoder, test.images)
    result = train_quantum_heads(
        extract_features(classifier.encoder, train.images),
        train.labels,
        val_features,
        val.labels,
        test_features,
        test.labels,
        p,
        seed,
        num_classes,
        params.common.device,
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
        save_heads(staged.path(out), result.hybrid, result.classical)
        write_history(staged.path(out) / "history.csv", result.history)
        if p.score_on_aer:
            log.info(
                "scoring the hybrid head on qiskit-aer (shots %s, depolarizing %g / %g)",
                p.aer_shots,
                p.aer_depolarizing_1q,
                p.aer_depolarizing_2q,
            )
            splits = {"val": (val_features, val.labels), "test": (test_features, test.labels)}
            metrics |= score_on_aer(staged.path(out), p, seed, splits)
            log.info(
                "on aer: val accuracy %.4f, test accuracy %.4f (%.1f s)",
                metrics["hybrid_aer_val_accuracy"],
                metrics["hybrid_aer_test_accuracy"],
                metrics["aer_score_seconds"],
            )
        write_json(staged.path(paths.report("quantum")), metrics)
        with (staged.path(out) / "circuit.qpy").open("rb") as handle:
            (reloaded,) = qpy.load(handle)
        if reloaded.num_qubits != p.n_qubits:  # never commit a circuit that does not load
            raise DataError(str(out / "circuit.qpy"), "written circuit does not load back")

    # The CLI logs params.quantum and the returned metrics; add what only this stage knows.
    tracker.log_params({"circuit": result.circuit_stats, "train_rows": len(result.train_index)})
    for epoch, losses in sorted(epoch_losses(result.history).items()):
        tracker.log_metrics(losses, step=epoch + 1)
    tracker.log_artifact(out, "quantum")
    return metrics
