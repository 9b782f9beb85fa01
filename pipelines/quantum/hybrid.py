"""Hybrid quantum-classical head and its classical twin of the same parameter count.

Both heads read the federated encoder's features ``(n, d)`` and share one layout:

    features → input map Linear(d, n_qubits) → block → readout Linear(n_qubits, classes)

- :class:`HybridHead`: the block is the circuit: the input map's outputs are the angles of a
  ZZ feature map, a ``real_amplitudes`` ansatz holds ``n_qubits · (reps + 1)`` trainable
  weights, and the block's outputs are ``<Z_i>`` per qubit. It runs on one of the
  backends of :mod:`pipelines.quantum.backends` (``torch`` by default).
- :class:`ClassicalHead`: the block is ``reps + 1`` layers of (elementwise scale, fixed ring
  mixing ``I + ½·shift``, tanh), ``n_qubits`` scales per layer: exactly as many trainable
  numbers as the ansatz has weights.

The input map is learned and reads the features divided by their mean training norm
(:func:`feature_scale`). Both heads start it from the same PCA of the training features,
scaled so the training rows span ``[0, π]`` (:class:`AngleEncoder`), start their block and
readout from the same seeded draws, see the same rows in the same order and take the same
steps. Weights are safetensors; the trained circuit (ansatz weights bound, angles free) is
kept as QPY for running it on other backends or hardware.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.io import load_weights, save_weights
from pipelines.quantum.backends import AerSettings, make_circuit_layer
from pipelines.quantum.circuits import FEATURE_MAP_REPS, build_circuit, circuit_stats, z_observables

log = logging.getLogger(__name__)

ANGLE_MAX = float(np.pi)
HEAD_NAMES = ("hybrid", "classical")
CIRCUIT_FILE = "circuit.qpy"
# Percentiles of the training projections mapped to 0 and π, so a few outliers do not
# squeeze every other sample into a narrow band of angles.
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.0


@dataclass(frozen=True)
class AngleEncoder:
    """Fixed map from features ``(n, d)`` to angles ``(n, k)`` in ``[0, π]``: PCA, then scale.

    ``angles = π · clip(((features - mean) @ components.T - low) / (high - low), 0, 1)``.
    """

    mean: np.ndarray
    components: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, n_components: int) -> AngleEncoder:
        """Fit PCA (SVD of the centred features) and the per-component angle scale."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be (n, d), got shape {features.shape}")
        n, d = features.shape
        if n_components > min(n, d):
            raise ValueError(
                f"cannot fit {n_components} components on {n} rows of {d} features "
                f"(need at least {n_components} of each)"
            )
        mean = features.mean(0)
        _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
        components = vt[:n_components]
        # SVD signs are arbitrary: make the largest loading of each component positive.
        signs = np.sign(components[np.arange(n_components), np.abs(components).argmax(1)])
        components = components * np.where(signs == 0, 1.0, signs)[:, None]
        projected = (features - mean) @ components.T
        low = np.percentile(projected, LOW_PERCENTILE, axis=0)
        high = np.percentile(projected, HIGH_PERCENTILE, axis=0)
        high = np.where(high - low > 1e-12, high, low + 1.0)
        return cls(mean, components, low, high)

    @property
    def n_components(self) -> int:
        """Number of angles per sample (the number of qubits)."""
        return int(self.components.shape[0])

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Angles ``(n, k)`` float32 in ``[0, π]``."""
        projected = (np.asarray(features, dtype=np.float64) - self.mean) @ self.components.T
        unit = np.clip((projected - self.low) / (self.high - self.low), 0.0, 1.0)
        return (unit * ANGLE_MAX).astype(np.float32)

    def linear_map(self) -> tuple[np.ndarray, np.ndarray]:
        """``(weight (k, d), bias (k,))`` with ``weight @ x + bias`` = the unclipped angles."""
        scale = ANGLE_MAX / (self.high - self.low)
        weight = self.components * scale[:, None]
        bias = -(self.mean @ self.components.T + self.low) * scale
        return weight, bias


def _uniform(shape: tuple[int, ...], low: float, high: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(shape, generator=generator, dtype=torch.float32) * (high - low) + low


def _linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """``Linear`` with torch's default init, drawn from ``seed`` (the same for both heads)."""
    layer = nn.Linear(in_features, out_features)
    bound = 1.0 / np.sqrt(in_features)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)
    return layer


def feature_scale(features: np.ndarray) -> float:
    """Mean L2 norm of the rows of ``features`` (1.0 when there are none or all are zero):
    the heads divide their input by it (see :class:`_Head`)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) == 0:
        return 1.0
    scale = float(np.linalg.norm(features, axis=1).mean())
    return scale if scale > 1e-12 else 1.0


class _Head(nn.Module):
    """Input map → block → readout; subclasses set ``block`` and ``kind``.

    The input map reads ``features / input_scale`` (a fixed number saved in the head's
    config; :func:`feature_scale` of the training features), so rows have a mean norm of 1.
    Adam moves each weight of the map by about the learning rate per step, so without it
    the angles' change per step grows with the features' scale: encoders trained longer
    have larger embeddings, and the hybrid head's periodic block then stops learning.
    """

    kind = ""

    def __init__(
        self,
        in_features: int,
        n_qubits: int,
        num_classes: int,
        seed: int,
        input_scale: float = 1.0,
    ):
        super().__init__()
        if not input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {input_scale}")
        self.input_scale = float(input_scale)
        self.input_map = _linear(in_features, n_qubits, seed + 2)
        self.readout = _linear(n_qubits, num_classes, seed + 1)

    def set_input_map(self, encoder: AngleEncoder) -> None:
        """Start the input map at the PCA-to-angles map of ``encoder`` (fitted on the raw
        features; the weights absorb ``input_scale``)."""
        weight, bias = encoder.linear_map()
        with torch.no_grad():
            self.input_map.weight.copy_(
                torch.as_tensor(weight * self.input_scale, dtype=torch.float32)
            )
            self.input_map.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def block(self, angles: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, num_classes)`` of features ``(n, d)``."""
        x = features.to(self.input_map.weight.device)
        angles = self.input_map(x / self.input_scale)
        hidden = self.block(angles)
        return self.readout(hidden.to(device=angles.device, dtype=self.readout.weight.dtype))


class HybridHead(_Head):
    """Features → angles → ``<Z_i>`` of the variational circuit → logits."""

    kind = "hybrid"

    def __init__(
        self,
        in_features: int,
        n_qubits: int,
        reps: int,
        entanglement: str,
        num_classes: int,
        seed: int = 0,
        backend: str = "torch",
        feature_reps: int = FEATURE_MAP_REPS,
        device: torch.device | None = None,
        aer: AerSettings | None = None,
        input_scale: float = 1.0,
    ):
        super().__init__(in_features, n_qubits, num_classes, seed, input_scale)
        circuit, inputs, weights = build_circuit(n_qubits, reps, entanglement, feature_reps)
        self.circuit, self.input_params, self.weight_params = circuit, inputs, weights
        initial = _uniform((len(weights),), -1.0, 1.0, seed).double().numpy()
        self.circuit_layer = make_circuit_layer(
            backend, circuit, inputs, weights, z_observables(n_qubits), initial, device, aer
        )
        # the torch backend runs where the circuit layer lives; estimator backends on the CPU
        if backend == "torch" and device is not None:
            self.input_map.to(device)
            self.readout.to(device)
        self.backend = backend
        self.config = {
            "kind": self.kind,
            "in_features": int(in_features),
            "n_qubits": int(n_qubits),
            "reps": int(reps),
            "entanglement": entanglement,
            "num_classes": int(num_classes),
            "feature_reps": int(feature_reps),
            "n_weights": len(weights),
            "input_scale": self.input_scale,
            "trained_on_backend": backend,
        }

    @property
    def circuit_evaluations(self) -> int:
        """Circuit results computed so far (see :mod:`pipelines.quantum.backends`)."""
        return int(self.circuit_layer.circuit_evaluations)

    def block(self, angles: torch.Tensor) -> torch.Tensor:
        """``<Z_i>`` per sample and qubit, ``(n, n_qubits)``."""
        return self.circuit_layer(angles)

    def bound_circuit(self):
        """The circuit with the current ansatz weights bound (the angles stay free)."""
        values = self.circuit_layer.weight.detach().cpu().double().numpy()
        return self.circuit.assign_parameters(dict(zip(self.weight_params, values, strict=True)))


class ClassicalHead(_Head):
    """Features → angles → ``reps + 1`` × (scale, fixed ring mixing, tanh) → logits.

    The scales are the only trainable numbers of the block: ``n_qubits`` per layer, exactly
    as many as the circuit's ansatz weights (checked on construction). The fixed mixing
    ``I + ½·shift`` couples neighbours on a ring, as the entangling gates do, and is
    invertible for every ``n_qubits``.
    """

    kind = "classical"

    def __init__(
        self,
        in_features: int,
        n_qubits: int,
        reps: int,
        entanglement: str,
        num_classes: int,
        seed: int = 0,
        feature_reps: int = FEATURE_MAP_REPS,
        device: torch.device | None = None,
        input_scale: float = 1.0,
    ):
        super().__init__(in_features, n_qubits, num_classes, seed, input_scale)
        _, _, weights = build_circuit(n_qubits, reps, entanglement, feature_reps)
        layers, remainder = divmod(len(weights), n_qubits)
        if remainder:
            raise ValueError(f"{len(weights)} circuit weights do not split into {n_qubits} lanes")
        self.scales = nn.Parameter(_uniform((layers * n_qubits,), -1.0, 1.0, seed))
        if self.scales.numel() != len(weights):
            raise AssertionError("classical mixing must have as many parameters as the circuit")
        shift = torch.roll(torch.eye(n_qubits), shifts=1, dims=0)
        self.register_buffer("mixing", torch.eye(n_qubits) + 0.5 * shift, persistent=False)
        self.layers, self.n_qubits = layers, n_qubits
        if device is not None:
            self.to(device)
        self.config = {
            "kind": self.kind,
            "in_features": int(in_features),
            "n_qubits": int(n_qubits),
            "reps": int(reps),
            "entanglement": entanglement,
            "num_classes": int(num_classes),
            "feature_reps": int(feature_reps),
            "n_weights": len(weights),
            "input_scale": self.input_scale,
            "layers": int(layers),
        }

    def block(self, angles: torch.Tensor) -> torch.Tensor:
        """The block that stands in for the circuit: ``(n, n_qubits)`` in ``(-1, 1)``."""
        hidden = angles.to(self.scales.dtype)
        for scale in self.scales.view(self.layers, self.n_qubits):
            hidden = torch.tanh((hidden * scale) @ self.mixing.T)
        return hidden


def count_trainable(module: nn.Module) -> int:
    """Number of trainable scalars in ``module``."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


def build_head(
    config: dict[str, Any],
    seed: int = 0,
    backend: str = "torch",
    device: torch.device | None = None,
    aer: AerSettings | None = None,
) -> nn.Module:
    """A head (hybrid or classical) from its saved config; the hybrid on ``backend``."""
    args = dict(
        in_features=int(config["in_features"]),
        n_qubits=int(config["n_qubits"]),
        reps=int(config["reps"]),
        entanglement=str(config["entanglement"]),
        num_classes=int(config["num_classes"]),
        seed=seed,
        feature_reps=int(config.get("feature_reps", FEATURE_MAP_REPS)),
        device=device,
        input_scale=float(config.get("input_scale", 1.0)),  # heads saved before it: 1
    )
    if config["kind"] == "hybrid":
        return HybridHead(**args, backend=backend, aer=aer)
    if config["kind"] == "classical":
        return ClassicalHead(**args)
    raise ValueError(f"unknown head kind '{config['kind']}'")


def _device_of(head: nn.Module) -> torch.device:
    return head.input_map.weight.device


def train_head(
    head: nn.Module, features: np.ndarray, labels: np.ndarray, params, seed: int
) -> list[dict[str, Any]]:
    """Adam on cross-entropy over seeded shuffles; one history row per step.

    ``params`` is a :class:`~pipelines.config.QuantumParams` (``batch_size``, ``epochs``,
    ``learning_rate``). The same ``seed`` gives the same batches to every head. Progress is
    logged once per epoch.
    """
    device = _device_of(head)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=params.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    name = getattr(head, "kind", type(head).__name__)
    history: list[dict[str, Any]] = []
    head.train()
    for epoch in range(params.epochs):
        order = rng.permutation(len(y))
        epoch_start = time.perf_counter()
        for start in range(0, len(y), params.batch_size):
            index = torch.as_tensor(order[start : start + params.batch_size], device=device)
            began = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_fn(head(x[index]), y[index])
            loss.backward()
            optimizer.step()
            history.append(
                {
                    "head": name,
                    "epoch": epoch,
                    "step": len(history),
                    "loss": float(loss.detach()),
                    "samples": len(index),
                    "seconds": time.perf_counter() - began,
                }
            )
        losses = [row["loss"] for row in history if row["epoch"] == epoch]
        log.info(
            "%s epoch %d/%d: mean loss %.4f (%.2f s)",
            name,
            epoch + 1,
            params.epochs,
            float(np.mean(losses)),
            time.perf_counter() - epoch_start,
        )
    head.eval()
    return history


def predict_logits(head: nn.Module, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits ``(n, num_classes)`` float32 of features ``(n, d)``, without gradients."""
    head.eval()
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    with torch.no_grad():
        parts = [head(x[i : i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)]
    if not parts:
        return np.zeros((0, head.readout.out_features), dtype=np.float32)
    return torch.cat(parts).numpy()


def save_heads(directory: str | Path, hybrid: HybridHead, classical: ClassicalHead) -> None:
    """Write both heads (safetensors + JSON) and the trained circuit (QPY)."""
    from qiskit import qpy

    directory = Path(directory)
    for head in (hybrid, classical):
        config = {**head.config, "trainable_params": count_trainable(head)}
        if head is hybrid:
            config["circuit"] = CIRCUIT_FILE
            config["circuit_stats"] = circuit_stats(hybrid.circuit, hybrid.weight_params)
        save_weights(head, directory, config, name=head.kind)
    with (directory / CIRCUIT_FILE).open("wb") as handle:
        qpy.dump(hybrid.bound_circuit(), handle)


def load_head(
    directory: str | Path,
    name: str,
    backend: str = "torch",
    device: torch.device | None = None,
    aer: AerSettings | None = None,
) -> nn.Module:
    """Rebuild head ``name`` (``hybrid`` or ``classical``); the hybrid runs on ``backend``."""
    state, config = load_weights(directory, name=name)
    head = build_head(config, backend=backend, device=device, aer=aer)
    head.load_state_dict(state)
    return head.eval()


def load_heads(
    directory: str | Path, batch_size: int = 1024
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """``{"hybrid": f, "classical": f}`` with ``f(features (n, d)) -> logits (n, classes)``.

    ``features`` are the federated encoder's embeddings; the hybrid head runs on the torch
    backend on the CPU (the same function as on any other backend).
    """
    heads: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for name in HEAD_NAMES:
        head = load_head(directory, name)

        def predict(features: np.ndarray, head: nn.Module = head) -> np.ndarray:
            return predict_logits(head, features, batch_size)

        heads[name] = predict
    return heads
