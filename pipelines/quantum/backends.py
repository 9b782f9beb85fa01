"""The circuit layer of the hybrid head, on each simulation backend.

Every backend computes the same function, ``<Z_i>`` of the head's circuit for a batch of
input angles and one weight vector, as a torch module with a trainable ``weight``
(the ansatz weights) and exact or sampled gradients for inputs and weights:

- ``torch`` (default): :class:`~pipelines.quantum.statevector.TorchQNN`, the batched
  statevector executor in torch (CPU or CUDA); gradients by autograd, exact.
- ``qiskit-ml``: ``EstimatorQNN`` + ``TorchConnector`` on
  :class:`~pipelines.quantum.primitive.TorchEstimator` with
  :class:`~pipelines.quantum.primitive.TorchEstimatorGradient`; exact.
- ``reference``: ``EstimatorQNN`` + ``TorchConnector`` on qiskit's ``StatevectorEstimator``
  with ``ParamShiftEstimatorGradient``; exact but slow (tiny budgets only).
- ``aer``: ``EstimatorQNN`` + ``TorchConnector`` on qiskit-aer's ``EstimatorV2`` (optional
  shot noise and depolarizing noise, see :class:`AerSettings`), parameter shift on Aer.

Weights trained on one backend load into any other: the state of every layer is the one
tensor ``weight``. Each layer counts ``circuit_evaluations``: one per (row of parameter
values, observable) that the estimator computes, as qiskit's estimators do; the torch layer
counts its forward rows times observables (its backward is autograd and simulates nothing
more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.primitives.containers.estimator_pub import EstimatorPub
from qiskit_machine_learning.connectors import TorchConnector
from qiskit_machine_learning.neural_networks import EstimatorQNN
from torch import nn

from pipelines.quantum.statevector import TorchQNN

BACKENDS = ("torch", "qiskit-ml", "reference", "aer")
# Gates qiskit-aer simulates natively; circuits are expanded to these before Aer sees them.
AER_BASIS = ("h", "x", "y", "z", "s", "sdg", "p", "rx", "ry", "rz", "cx", "cz", "rzz", "swap")


@dataclass(frozen=True)
class AerSettings:
    """How the ``aer`` backend simulates: shots (None = exact expectations) and noise.

    ``shots`` becomes the estimator precision ``1/sqrt(shots)`` (Aer's EstimatorV2 adds
    Gaussian noise of that standard deviation, the worst case of ``shots`` samples of a
    Pauli). ``depolarizing_1q`` / ``depolarizing_2q`` are depolarizing error probabilities
    after every one- and two-qubit gate (0 = noiseless).
    """

    shots: int | None = None
    depolarizing_1q: float = 0.0
    depolarizing_2q: float = 0.0
    seed: int = 0

    @property
    def precision(self) -> float:
        """Estimator precision: 0 for exact expectations."""
        return 0.0 if not self.shots else float(1.0 / np.sqrt(self.shots))

    @property
    def noisy(self) -> bool:
        """True when a noise model is applied."""
        return self.depolarizing_1q > 0 or self.depolarizing_2q > 0


def _counting(estimator_class: type) -> type:
    """A subclass of ``estimator_class`` whose ``run`` counts the results it computes."""

    class Counting(estimator_class):
        circuit_evaluations = 0

        def run(self, pubs, *, precision=None):
            pubs = list(pubs)
            default = precision
            if default is None:  # Aer keeps its default in options, qiskit on the estimator
                default = getattr(self, "default_precision", None)
            if default is None:
                default = getattr(self.options, "default_precision", 0.0) or 0.0
            self.circuit_evaluations += int(
                sum(np.prod(EstimatorPub.coerce(pub, default).shape, dtype=int) for pub in pubs)
            )
            return super().run(pubs, precision=precision)

    Counting.__name__ = f"Counting{estimator_class.__name__}"
    return Counting


def _drop_alias(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    state.pop(f"{prefix}_weights", None)


def _restore_alias(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    if f"{prefix}weight" in state:
        state.setdefault(f"{prefix}_weights", state[f"{prefix}weight"])


class TorchCircuitLayer(TorchQNN):
    """``torch`` backend: the batched torch statevector executor, float64, exact."""

    def __init__(self, circuit, inputs, weights, observables, initial):
        super().__init__(circuit, inputs, weights, observables, initial_weights=initial)
        self.n_observables = len(observables)
        self.circuit_evaluations = 0

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        """``<Z_i>`` ``(n, n_qubits)`` float64 on the layer's device."""
        self.circuit_evaluations += int(angles.shape[0]) * self.n_observables
        return super().forward(angles.to(self.weight.device))


class EstimatorCircuitLayer(TorchConnector):
    """``qiskit-ml``, ``reference`` and ``aer`` backends: EstimatorQNN + TorchConnector."""

    def __init__(
        self, circuit, inputs, weights, observables, initial, estimator, gradient, precision=0.0
    ):
        qnn = EstimatorQNN(
            circuit=circuit,
            estimator=estimator,
            observables=observables,
            input_params=inputs,
            weight_params=weights,
            gradient=gradient,
            input_gradients=True,
            # EstimatorQNN's own default (1/64) makes exact estimators add sampling noise
            default_precision=precision,
        )
        super().__init__(qnn, initial_weights=np.asarray(initial))
        self.estimator = estimator
        # TorchConnector registers its weights twice ("weight" and "_weights", one tensor);
        # safetensors refuses shared tensors, so the state holds "weight" only.
        self.register_state_dict_post_hook(_drop_alias)
        self.register_load_state_dict_pre_hook(_restore_alias)

    @property
    def circuit_evaluations(self) -> int:
        """Results the estimator computed so far (forward and gradient circuits)."""
        return int(getattr(self.estimator, "circuit_evaluations", 0))

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        """``<Z_i>`` ``(n, n_qubits)`` (the estimators run on the CPU)."""
        return super().forward(angles.cpu())


def _aer_estimator_and_gradient(settings: AerSettings):
    from qiskit_aer.noise import NoiseModel, depolarizing_error
    from qiskit_aer.primitives import EstimatorV2 as AerEstimator
    from qiskit_machine_learning.gradients import ParamShiftEstimatorGradient

    backend_options: dict[str, Any] = {}
    if settings.noisy:
        noise = NoiseModel()
        one = [g for g in AER_BASIS if g not in ("cx", "cz", "rzz", "swap")]
        if settings.depolarizing_1q > 0:
            noise.add_all_qubit_quantum_error(depolarizing_error(settings.depolarizing_1q, 1), one)
        if settings.depolarizing_2q > 0:
            noise.add_all_qubit_quantum_error(
                depolarizing_error(settings.depolarizing_2q, 2), ["cx", "cz", "rzz", "swap"]
            )
        backend_options = {"noise_model": noise, "method": "density_matrix"}
    options = {
        "default_precision": settings.precision,
        "backend_options": backend_options,
        "run_options": {"seed_simulator": settings.seed},
    }
    estimator = _counting(AerEstimator)(options=options)
    return estimator, ParamShiftEstimatorGradient(estimator)


def expand_for_aer(circuit: QuantumCircuit) -> QuantumCircuit:
    """The circuit expanded to gates Aer simulates (library blocks are opaque to Aer)."""
    from qiskit import transpile

    return transpile(circuit, basis_gates=list(AER_BASIS), optimization_level=0)


def make_circuit_layer(
    backend: str,
    circuit: QuantumCircuit,
    inputs: list[Parameter],
    weights: list[Parameter],
    observables: list,
    initial: np.ndarray,
    device: torch.device | None = None,
    aer: AerSettings | None = None,
) -> nn.Module:
    """The circuit layer of ``backend`` (see the module docstring), weights ``initial``."""
    initial = np.asarray(initial, dtype=np.float64)
    precision = 0.0
    if backend == "torch":
        layer = TorchCircuitLayer(circuit, inputs, weights, observables, initial)
        return layer.to(device or torch.device("cpu"))
    if backend == "qiskit-ml":
        from pipelines.quantum.primitive import TorchEstimator, TorchEstimatorGradient

        estimator = _counting(TorchEstimator)()
        gradient = TorchEstimatorGradient(estimator)
    elif backend == "reference":
        from qiskit.primitives import StatevectorEstimator
        from qiskit_machine_learning.gradients import ParamShiftEstimatorGradient

        estimator = _counting(StatevectorEstimator)()
        gradient = ParamShiftEstimatorGradient(estimator)
    elif backend == "aer":
        aer = aer or AerSettings()
        estimator, gradient = _aer_estimator_and_gradient(aer)
        circuit = expand_for_aer(circuit)
        precision = aer.precision
    else:
        raise ValueError(f"unknown quantum backend '{backend}'; known: {', '.join(BACKENDS)}")
    return EstimatorCircuitLayer(
        circuit, inputs, weights, observables, initial, estimator, gradient, precision
    )
