"""Qiskit primitives backed by the torch statevector executor.

- :class:`TorchEstimator`: an Estimator V2 (``BaseEstimatorV2``) with the semantics of
  :class:`qiskit.primitives.StatevectorEstimator` (same PUB coercion, broadcasting of
  parameter values against observables, result containers and metadata), computed in
  batches by :class:`~pipelines.quantum.statevector.TorchCircuit`. Results are exact: the
  requested precision is recorded in the metadata but no shot noise is added, and ``stds``
  are zeros.
- :class:`TorchEstimatorGradient`: a qiskit-machine-learning ``BaseEstimatorGradient`` giving
  exact gradients by autograd, laid out like ``ParamShiftEstimatorGradient``'s, so
  ``EstimatorQNN(..., estimator=TorchEstimator(), gradient=TorchEstimatorGradient())`` and
  ``TorchConnector`` work unchanged.

Compiled circuits are cached per circuit object (by identity, checked against the number of
instructions and parameters): a circuit changed in place in any other way after its first
run must be passed as a new object.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.primitives import BaseEstimatorV2, DataBin, PrimitiveResult, PubResult
from qiskit.primitives.containers import EstimatorPubLike
from qiskit.primitives.containers.estimator_pub import EstimatorPub
from qiskit.primitives.primitive_job import PrimitiveJob
from qiskit.providers import Options
from qiskit.quantum_info import SparsePauliOp
from qiskit.quantum_info.operators.base_operator import BaseOperator
from qiskit.transpiler.passmanager import BasePassManager
from qiskit_machine_learning.gradients import (
    BaseEstimatorGradient,
    DerivativeType,
    EstimatorGradientResult,
)

from pipelines.quantum.statevector import PauliObservables, TorchCircuit

__all__ = ["TorchEstimator", "TorchEstimatorGradient"]

# Amplitudes simulated at once: rows of parameter values are split into chunks of at most
# this many amplitudes (rows x 2**n). Gradients keep every intermediate state, so they use a
# smaller default.
DEFAULT_MAX_AMPLITUDES = 1 << 22
DEFAULT_MAX_GRADIENT_AMPLITUDES = 1 << 18


def _row_chunks(rows: int, dimension: int, max_amplitudes: int) -> Iterable[slice]:
    step = max(1, max_amplitudes // dimension)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _observable_key(observable: Any) -> tuple:
    """A hashable key of a Pauli-sum observable (dict form or operator)."""
    if isinstance(observable, dict):
        return tuple(sorted((label, complex(coeff)) for label, coeff in observable.items()))
    operator = SparsePauliOp(observable).simplify(atol=0.0)
    labels = operator.paulis.to_labels()
    return tuple(sorted(zip(labels, (complex(c) for c in operator.coeffs), strict=True)))


class TorchEstimator(BaseEstimatorV2):
    """Exact Estimator V2 primitive simulating circuits with the batched torch executor.

    Args:
        default_precision: Precision used when neither the PUB nor ``run`` gives one; it is
            only recorded (results are exact).
        dtype: Executor dtype, ``torch.complex128`` (default) or ``torch.complex64``.
        device: Torch device to simulate on (default CPU).
        max_amplitudes: Largest number of amplitudes (rows x 2**n) simulated at once.
        max_gradient_amplitudes: The same for :class:`TorchEstimatorGradient` runs, which
            keep every intermediate state for autograd.
        cache_size: Compiled circuits (and observable sets) kept, least recently used first
            out.
    """

    def __init__(
        self,
        *,
        default_precision: float = 0.0,
        dtype: torch.dtype = torch.complex128,
        device: torch.device | str | None = None,
        max_amplitudes: int = DEFAULT_MAX_AMPLITUDES,
        max_gradient_amplitudes: int = DEFAULT_MAX_GRADIENT_AMPLITUDES,
        cache_size: int = 32,
    ):
        self._default_precision = default_precision
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.max_amplitudes = int(max_amplitudes)
        self.max_gradient_amplitudes = int(max_gradient_amplitudes)
        self.cache_size = int(cache_size)
        self._circuits: OrderedDict[tuple, tuple[QuantumCircuit, tuple, TorchCircuit]] = (
            OrderedDict()
        )
        self._observables: OrderedDict[tuple, PauliObservables] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def default_precision(self) -> float:
        """The precision recorded when none is given (results are exact regardless)."""
        return self._default_precision

    @property
    def options(self) -> Options:
        """Primitive options (none apply; present for qiskit-machine-learning)."""
        return Options()

    def compile(
        self, circuit: QuantumCircuit, parameters: Sequence[Parameter] | None = None
    ) -> TorchCircuit:
        """The cached :class:`TorchCircuit` of ``circuit`` (parameter order ``parameters``,
        default ``circuit.parameters``)."""
        order = tuple(circuit.parameters if parameters is None else parameters)
        key = (id(circuit), order)
        fingerprint = (len(circuit.data), circuit.num_parameters, circuit.num_qubits)
        with self._lock:
            entry = self._circuits.get(key)
            if entry is not None and entry[0] is circuit and entry[1] == fingerprint:
                self._circuits.move_to_end(key)
                return entry[2]
        compiled = TorchCircuit(circuit, order, dtype=self.dtype)
        with self._lock:
            self._circuits[key] = (circuit, fingerprint, compiled)
            while len(self._circuits) > self.cache_size:
                self._circuits.popitem(last=False)
        return compiled

    def compile_observables(self, observables: Sequence[Any], num_qubits: int) -> PauliObservables:
        """Cached :class:`PauliObservables` for a sequence of observables."""
        key = (num_qubits, tuple(_observable_key(observable) for observable in observables))
        with self._lock:
            compiled = self._observables.get(key)
            if compiled is not None:
                self._observables.move_to_end(key)
                return compiled
        compiled = PauliObservables(list(observables), num_qubits)
        with self._lock:
            self._observables[key] = compiled
            while len(self._observables) > self.cache_size:
                self._observables.popitem(last=False)
        return compiled

    def run(
        self, pubs: Iterable[EstimatorPubLike], *, precision: float | None = None
    ) -> PrimitiveJob[PrimitiveResult[PubResult]]:
        """Estimate expectation values for each PUB (see ``BaseEstimatorV2.run``)."""
        if precision is None:
            precision = self._default_precision
        coerced_pubs = [EstimatorPub.coerce(pub, precision) for pub in pubs]
        job = PrimitiveJob(self._run, coerced_pubs)
        job._submit()
        return job

    def _run(self, pubs: list[EstimatorPub]) -> PrimitiveResult[PubResult]:
        # PUBs of one circuit with the same parameter values (one per observable, as
        # EstimatorQNN sends them) reuse the simulated states.
        states: dict[tuple, torch.Tensor] = {}
        return PrimitiveResult(
            [self._run_pub(pub, states) for pub in pubs], metadata={"version": 2}
        )

    def _run_pub(self, pub: EstimatorPub, states: dict[tuple, torch.Tensor]) -> PubResult:
        circuit = pub.circuit
        executor = self.compile(circuit)
        bindings = pub.parameter_values
        rows = int(np.prod(bindings.shape, dtype=np.int64))
        values = bindings.as_array(circuit.parameters).reshape(rows, circuit.num_parameters)
        observables = np.asarray(pub.observables.__array__(), dtype=object)
        flat_observables = list(observables.reshape(-1))
        unique: dict[tuple, int] = {}
        observable_index = np.empty(len(flat_observables), dtype=np.int64)
        unique_observables = []
        for position, observable in enumerate(flat_observables):
            key = _observable_key(observable)
            if key not in unique:
                unique[key] = len(unique_observables)
                unique_observables.append(observable)
            observable_index[position] = unique[key]
        compiled = self.compile_observables(unique_observables, circuit.num_qubits)

        table = np.empty((values.shape[0], len(unique_observables)))
        dimension = 1 << circuit.num_qubits
        with torch.no_grad():
            for chunk_rows in _row_chunks(rows, dimension, self.max_amplitudes):
                chunk = values[chunk_rows]
                key = (id(executor), chunk.shape, chunk.tobytes())
                state = states.get(key)
                if state is None:
                    tensor = torch.as_tensor(chunk, dtype=executor.real_dtype, device=self.device)
                    state = executor.state(tensor, include_global_phase=False)
                    states.clear()  # keep only the latest: PUBs sharing values come together
                    states[key] = state
                table[chunk_rows] = compiled.expectation(state).cpu().double().numpy()

        row_index = np.arange(rows).reshape(bindings.shape)
        row_index, column_index = np.broadcast_arrays(
            row_index, observable_index.reshape(observables.shape)
        )
        evs = np.asarray(table[row_index, column_index], dtype=np.float64)
        stds = np.zeros_like(evs)
        data = DataBin(evs=evs, stds=stds, shape=evs.shape)
        return PubResult(
            data, metadata={"target_precision": pub.precision, "circuit_metadata": circuit.metadata}
        )


class TorchEstimatorGradient(BaseEstimatorGradient):
    """Exact estimator gradients by autograd through the torch statevector executor.

    Gradients are with respect to the circuits' own parameters (no gate translation or
    parameter renaming is involved), for the requested subset and in its order; the result
    layout and metadata follow ``ParamShiftEstimatorGradient`` (plus ``derivative_type`` in
    the metadata, as ``LinCombEstimatorGradient`` adds). ``DerivativeType.REAL`` gives
    ``d<O>/dθ = 2 Re<ψ|O|∂θ ψ>``, ``IMAG`` gives ``2 Im<ψ|O|∂θ ψ>`` and ``COMPLEX`` both.
    The imaginary part depends on the state's phase: here ``ψ`` is exactly the state
    ``Statevector(circuit)`` gives (global phase and the phases of ``p``, ``cp``, ``u``, ...
    included), whereas ``LinCombEstimatorGradient`` first rewrites such gates into rotations
    without their phase, so the two agree on circuits of rotation gates but not in general.

    Args:
        estimator: The :class:`TorchEstimator` whose settings (dtype, device, chunk size) and
            compiled-circuit cache are used; a new one by default.
        options: Stored and reported like other gradients' options (none affect the result).
        derivative_type: See above.
        pass_manager: Optional pass manager applied to each circuit first (the observables
            follow its layout), as other gradients do.
    """

    def __init__(
        self,
        estimator: TorchEstimator | None = None,
        options: Options | None = None,
        derivative_type: DerivativeType = DerivativeType.REAL,
        pass_manager: BasePassManager | None = None,
    ):
        if estimator is None:
            estimator = TorchEstimator()
        if not isinstance(estimator, TorchEstimator):
            raise TypeError(
                f"TorchEstimatorGradient needs a TorchEstimator, got {type(estimator).__name__}"
            )
        super().__init__(estimator, options, derivative_type, pass_manager)
        self._transpiled: dict[int, tuple[QuantumCircuit, QuantumCircuit]] = {}

    def _target_circuit(self, circuit: QuantumCircuit) -> QuantumCircuit:
        if self._pass_manager is None:
            return circuit
        entry = self._transpiled.get(id(circuit))
        if entry is None or entry[0] is not circuit:
            entry = (circuit, self._pass_manager.run(circuit))
            self._transpiled[id(circuit)] = entry
        return entry[1]

    def _run(
        self,
        circuits: Sequence[QuantumCircuit],
        observables: Sequence[BaseOperator],
        parameter_values: Sequence[Sequence[float]] | np.ndarray,
        parameters: Sequence[Sequence[Parameter]],
        **options: Any,
    ) -> EstimatorGradientResult:
        """Compute the gradients of the expectation values by autograd."""
        estimator: TorchEstimator = self._estimator  # type: ignore[assignment]
        gradients: list[np.ndarray | None] = [None] * len(circuits)
        groups: dict[int, list[int]] = {}
        for position, circuit in enumerate(circuits):
            groups.setdefault(id(circuit), []).append(position)

        for positions in groups.values():
            circuit = circuits[positions[0]]
            target = self._target_circuit(circuit)
            order = list(circuit.parameters)
            executor = estimator.compile(target, order)
            layout = target.layout if target is not circuit else None
            unique: dict[tuple, int] = {}
            index_by_object: dict[int, int] = {}  # the same operator object is often repeated
            unique_observables = []
            observable_index = np.empty(len(positions), dtype=np.int64)
            for row, position in enumerate(positions):
                observable = observables[position]
                known = index_by_object.get(id(observable))
                if known is None:
                    mapped = observable
                    if layout is not None:
                        mapped = SparsePauliOp(observable).apply_layout(layout)
                    key = _observable_key(mapped)
                    if key not in unique:
                        unique[key] = len(unique_observables)
                        unique_observables.append(mapped)
                    known = index_by_object[id(observable)] = unique[key]
                observable_index[row] = known
            compiled = estimator.compile_observables(unique_observables, target.num_qubits)
            values = np.asarray([parameter_values[p] for p in positions], dtype=np.float64)
            full = self._gradient_rows(executor, compiled, values, observable_index)
            column = {param: i for i, param in enumerate(order)}
            selections: dict[int, list[int]] = {}
            for row, position in enumerate(positions):
                requested = parameters[position]
                selected = selections.get(id(requested))
                if selected is None:
                    selected = selections[id(requested)] = [column[p] for p in requested]
                gradients[position] = full[row, selected]

        metadata = [
            {"parameters": parameters_, "derivative_type": self._derivative_type}
            for parameters_ in parameters
        ]
        return EstimatorGradientResult(
            gradients=gradients,  # type: ignore[arg-type]
            metadata=metadata,
            options=Options(**options),
        )

    def _gradient_rows(
        self,
        executor: TorchCircuit,
        observables: PauliObservables,
        values: np.ndarray,
        observable_index: np.ndarray,
    ) -> np.ndarray:
        """Gradient ``(rows, n_params)`` of row ``i``'s expectation of observable
        ``observable_index[i]`` with respect to its own parameter values."""
        estimator: TorchEstimator = self._estimator  # type: ignore[assignment]
        derivative = self._derivative_type
        dtype = np.complex128 if derivative == DerivativeType.COMPLEX else np.float64
        result = np.zeros(values.shape, dtype=dtype)
        dimension = 1 << executor.num_qubits
        for rows in _row_chunks(values.shape[0], dimension, estimator.max_gradient_amplitudes):
            tensor = torch.tensor(
                values[rows], dtype=executor.real_dtype, device=estimator.device, requires_grad=True
            )
            pick = torch.as_tensor(observable_index[rows], device=estimator.device).unsqueeze(1)
            if derivative == DerivativeType.REAL:
                expectation = executor.expectation_values(tensor, observables)
                (grad,) = torch.autograd.grad(
                    expectation.gather(1, pick).sum(), tensor, materialize_grads=True
                )
                result[rows] = grad.detach().cpu().double().numpy()
                continue
            # 2<ψ|O|∂ψ> = gradient of 2<ψ_fixed|O|ψ(θ)>, real and imaginary parts separately.
            # The imaginary part depends on phases, so the state is exactly Statevector's.
            state = executor.state(tensor, include_global_phase=True)
            overlap = 2.0 * observables.inner(state.detach(), state).gather(1, pick).sum()
            imag = torch.autograd.grad(
                overlap.imag, tensor, retain_graph=True, materialize_grads=True
            )[0]
            imag = imag.detach().cpu().double().numpy()
            if derivative == DerivativeType.IMAG:
                result[rows] = imag
            else:
                real = torch.autograd.grad(overlap.real, tensor, materialize_grads=True)[0]
                real = real.detach().cpu().double()
                result[rows] = real.numpy() + 1j * imag
        return result
