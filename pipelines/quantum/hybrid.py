"""Hybrid quantum-classical head and its classical twin of the same parameter count.

Both heads read the same fixed angles: an :class:`AngleEncoder` (PCA of the encoder's
features to ``n_qubits`` components, scaled to ``[0, π]``) fitted once on training features
and never trained, so no gradient with respect to the circuit inputs is needed (with
qiskit-machine-learning that halves the cost of a step).

- :class:`HybridHead`: angles → ZZ feature map + ``real_amplitudes`` ansatz, read out as
  ``<Z_i>`` per qubit through ``EstimatorQNN`` + ``TorchConnector`` (exact
  ``StatevectorEstimator``, gradients by parameter shift) → ``Linear(n_qubits, classes)``.
- :class:`ClassicalHead`: angles → ``reps + 1`` layers of (elementwise scale, fixed ring
  mixing ``I + ½·shift``, tanh), ``n_qubits`` scales per layer, i.e. exactly as many
  trainable numbers as the ansatz has weights → the same ``Linear(n_qubits, classes)``.

Both start from the same numbers (the same seed draws the ansatz weights and the scales
from ``U(-1, 1)``, and the readout layers identically), see the same rows in the same order,
and take the same steps. Weights are safetensors; the trained circuit (weights bound,
inputs free) is kept as QPY for reference and for running it on other backends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from qiskit.primitives import StatevectorEstimator
from qiskit.primitives.containers.estimator_pub import EstimatorPub
from torch import nn

from pipelines.io import load_weights, save_weights
from pipelines.quantum.circuits import FEATURE_MAP_REPS, build_circuit, circuit_stats, z_observables

log = logging.getLogger(__name__)

ANGLE_MAX = float(np.pi)
HEAD_NAMES = ("hybrid", "classical")
ENCODER_FILE = "angle_encoder.safetensors"
CIRCUIT_FILE = "circuit.qpy"
# Percentiles of the training projections mapped to 0 and π (values beyond are clipped), so
# a few outliers do not squeeze every other sample into a narrow band of angles.
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

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays, for safetensors."""
        return {
            name: np.ascontiguousarray(getattr(self, name), dtype=np.float64)
            for name in ("mean", "components", "low", "high")
        }

    def save(self, path: str | Path) -> None:
        """Write the arrays as safetensors."""
        from safetensors.numpy import save_file

        save_file(self.to_arrays(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> AngleEncoder:
        """Read an encoder written by :meth:`save`."""
        from safetensors.numpy import load_file

        from pipelines.errors import DataError

        if not Path(path).is_file():
            raise DataError(str(path), "angle encoder not found (has the quantum stage run?)")
        arrays = load_file(str(path))
        return cls(arrays["mean"], arrays["components"], arrays["low"], arrays["high"])


class CountingEstimator(StatevectorEstimator):
    """Exact ``StatevectorEstimator`` (precision 0) that counts the circuits it simulates.

    One evaluation = one bound circuit simulated for one observable: the estimator builds a
    fresh statevector for every element of a pub's broadcast shape, so that is what is
    counted. ``calls`` counts ``run`` calls (jobs).
    """

    def __init__(self) -> None:
        super().__init__(default_precision=0.0)
        self.circuit_evaluations = 0
        self.calls = 0

    def run(self, pubs: Iterable[Any], *, precision: float | None = None):
        """Count, then run the pubs exactly as ``StatevectorEstimator`` does."""
        pubs = list(pubs)
        default = self.default_precision if precision is None else precision
        shapes = [EstimatorPub.coerce(pub, default).shape for pub in pubs]
        self.calls += 1
        self.circuit_evaluations += int(sum(np.prod(shape, dtype=int) for shape in shapes))
        return super().run(pubs, precision=precision)


def _uniform(shape: tuple[int, ...], low: float, high: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.rand(shape, generator=generator, dtype=torch.float32) * (high - low) + low


def _readout(n_qubits: int, num_classes: int, seed: int) -> nn.Linear:
    """``Linear(n_qubits, num_classes)`` with torch's default init, drawn from ``seed``."""
    layer = nn.Linear(n_qubits, num_classes)
    bound = 1.0 / np.sqrt(n_qubits)
    generator = torch.Generator().manual_seed(int(seed) + 1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)
    return layer


def _drop_alias(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    state.pop(f"{prefix}_weights", None)


def _restore_alias(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    if f"{prefix}weight" in state:
        state.setdefault(f"{prefix}_weights", state[f"{prefix}weight"])


class HybridHead(nn.Module):
    """Angles ``(n, n_qubits)`` → ``<Z_i>`` of the variational circuit → linear → logits.

    Only the ansatz weights and the readout layer train; ``input_gradients=False``.
    """

    kind = "hybrid"

    def __init__(
        self,
        n_qubits: int,
        reps: int,
        entanglement: str,
        num_classes: int,
        seed: int = 0,
        feature_reps: int = FEATURE_MAP_REPS,
        estimator=None,
    ):
        super().__init__()
        from qiskit_machine_learning.connectors import TorchConnector
        from qiskit_machine_learning.neural_networks import EstimatorQNN

        circuit, inputs, weights = build_circuit(n_qubits, reps, entanglement, feature_reps)
        self.circuit, self.input_params, self.weight_params = circuit, inputs, weights
        self.estimator = estimator if estimator is not None else CountingEstimator()
        qnn = EstimatorQNN(
            circuit=circuit,
            estimator=self.estimator,
            observables=z_observables(n_qubits),
            input_params=inputs,
            weight_params=weights,
            input_gradients=False,
            default_precision=0.0,  # exact expectations; > 0 adds sampling noise
        )
        initial = _uniform((len(weights),), -1.0, 1.0, seed).numpy()
        self.qnn = TorchConnector(qnn, initial_weights=initial)
        # TorchConnector registers its weights twice ("weight" and "_weights", one tensor);
        # safetensors refuses shared tensors, so the state holds "weight" only.
        self.qnn.register_state_dict_post_hook(_drop_alias)
        self.qnn.register_load_state_dict_pre_hook(_restore_alias)
        self.readout = _readout(n_qubits, num_classes, seed)
        self.config = {
            "kind": self.kind,
            "n_qubits": int(n_qubits),
            "reps": int(reps),
            "entanglement": entanglement,
            "num_classes": int(num_classes),
            "feature_reps": int(feature_reps),
            "n_weights": len(weights),
            "estimator": "StatevectorEstimator (exact, precision 0)",
            "gradient": "parameter shift on the ansatz weights only",
        }

    @property
    def circuit_evaluations(self) -> int:
        """Circuits simulated so far (forward and parameter shift), if the estimator counts."""
        return int(getattr(self.estimator, "circuit_evaluations", 0))

    def expectations(self, angles: torch.Tensor) -> torch.Tensor:
        """``<Z_i>`` per sample and qubit, ``(n, n_qubits)``."""
        return self.qnn(angles)

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, num_classes)`` of angles ``(n, n_qubits)``."""
        return self.readout(self.expectations(angles).to(self.readout.weight.dtype))

    def bound_circuit(self):
        """The circuit with the current weights bound (the inputs stay free parameters)."""
        values = self.qnn.weight.detach().cpu().double().numpy()
        return self.circuit.assign_parameters(dict(zip(self.weight_params, values, strict=True)))


class ClassicalHead(nn.Module):
    """Angles → ``reps + 1`` × (scale, fixed ring mixing, tanh) → linear → logits.

    The scales are the only trainable numbers before the readout: ``n_qubits`` per layer,
    exactly as many as the circuit's ansatz weights (checked on construction). The fixed
    mixing ``I + ½·shift`` couples neighbours on a ring, as the entangling gates do, and is
    invertible for every ``n_qubits``.
    """

    kind = "classical"

    def __init__(
        self,
        n_qubits: int,
        reps: int,
        entanglement: str,
        num_classes: int,
        seed: int = 0,
        feature_reps: int = FEATURE_MAP_REPS,
    ):
        super().__init__()
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
        self.readout = _readout(n_qubits, num_classes, seed)
        self.config = {
            "kind": self.kind,
            "n_qubits": int(n_qubits),
            "reps": int(reps),
            "entanglement": entanglement,
            "num_classes": int(num_classes),
            "feature_reps": int(feature_reps),
            "n_weights": len(weights),
            "layers": int(layers),
        }

    def mix(self, angles: torch.Tensor) -> torch.Tensor:
        """The block that stands in for the circuit: ``(n, n_qubits)`` in ``(-1, 1)``."""
        hidden = angles.to(self.scales.dtype)
        for scale in self.scales.view(self.layers, self.n_qubits):
            hidden = torch.tanh((hidden * scale) @ self.mixing.T)
        return hidden

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, num_classes)`` of angles ``(n, n_qubits)``."""
        return self.readout(self.mix(angles))


def count_trainable(module: nn.Module) -> int:
    """Number of trainable scalars in ``module``."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


def build_head(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """A head (hybrid or classical) from its saved config."""
    cls = {"hybrid": HybridHead, "classical": ClassicalHead}[config["kind"]]
    return cls(
        n_qubits=int(config["n_qubits"]),
        reps=int(config["reps"]),
        entanglement=str(config["entanglement"]),
        num_classes=int(config["num_classes"]),
        seed=seed,
        feature_reps=int(config.get("feature_reps", FEATURE_MAP_REPS)),
    )


def train_head(
    head: nn.Module, angles: np.ndarray, labels: np.ndarray, params, seed: int
) -> list[dict[str, Any]]:
    """Adam on cross-entropy over seeded shuffles; one history row per step.

    ``params`` is a :class:`~pipelines.config.QuantumParams` (``batch_size``, ``epochs``,
    ``learning_rate``). The same ``seed`` gives the same batches to every head.
    """
    x = torch.as_tensor(np.asarray(angles, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=params.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-len(y) // params.batch_size)
    name = getattr(head, "kind", type(head).__name__)
    history: list[dict[str, Any]] = []
    head.train()
    for epoch in range(params.epochs):
        order = rng.permutation(len(y))
        for batch, start in enumerate(range(0, len(y), params.batch_size)):
            index = torch.as_tensor(order[start : start + params.batch_size])
            began = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_fn(head(x[index]), y[index])
            loss.backward()
            optimizer.step()
            seconds = time.perf_counter() - began
            history.append(
                {
                    "head": name,
                    "epoch": epoch,
                    "step": len(history),
                    "loss": float(loss.detach()),
                    "samples": len(index),
                    "seconds": seconds,
                }
            )
            log.info(
                "%s epoch %d/%d batch %d/%d: loss %.4f (%.2f s)",
                name,
                epoch + 1,
                params.epochs,
                batch + 1,
                steps_per_epoch,
                history[-1]["loss"],
                seconds,
            )
    head.eval()
    return history


def predict_logits(head: nn.Module, angles: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits ``(n, num_classes)`` float32 of angles ``(n, n_qubits)``, without gradients."""
    head.eval()
    x = torch.as_tensor(np.asarray(angles, dtype=np.float32))
    with torch.no_grad():
        parts = [head(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
    if not parts:
        return np.zeros((0, head.readout.out_features), dtype=np.float32)
    return torch.cat(parts).numpy()


def save_heads(
    directory: str | Path, encoder: AngleEncoder, hybrid: HybridHead, classical: ClassicalHead
) -> None:
    """Write both heads (safetensors + JSON), the angle encoder and the trained circuit (QPY)."""
    from qiskit import qpy

    directory = Path(directory)
    for head in (hybrid, classical):
        config = {
            **head.config,
            "trainable_params": count_trainable(head),
            "angle_encoder": ENCODER_FILE,
        }
        if head is hybrid:
            config["circuit"] = CIRCUIT_FILE
            config["circuit_stats"] = circuit_stats(hybrid.circuit, hybrid.weight_params)
        save_weights(head, directory, config, name=head.kind)
    encoder.save(directory / ENCODER_FILE)
    with (directory / CIRCUIT_FILE).open("wb") as handle:
        qpy.dump(hybrid.bound_circuit(), handle)


def load_head(directory: str | Path, name: str) -> nn.Module:
    """Rebuild head ``name`` (``hybrid`` or ``classical``) from its safetensors and JSON."""
    state, config = load_weights(directory, name=name)
    head = build_head(config)
    head.load_state_dict(state)
    return head.eval()


def load_angle_encoder(directory: str | Path) -> AngleEncoder:
    """The fitted angle encoder saved beside the heads."""
    return AngleEncoder.load(Path(directory) / ENCODER_FILE)


def load_heads(
    directory: str | Path, batch_size: int = 256
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """``{"hybrid": f, "classical": f}`` with ``f(features (n, d)) -> logits (n, classes)``.

    ``features`` are the federated encoder's embeddings; each function applies the saved
    angle encoder, then the head.
    """
    directory = Path(directory)
    encoder = load_angle_encoder(directory)
    heads: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for name in HEAD_NAMES:
        head = load_head(directory, name)

        def predict(features: np.ndarray, head: nn.Module = head) -> np.ndarray:
            return predict_logits(head, encoder.transform(features), batch_size)

        heads[name] = predict
    return heads
