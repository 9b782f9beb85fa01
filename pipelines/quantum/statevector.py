"""Batched, differentiable statevector simulation of qiskit circuits in torch.

:class:`TorchCircuit` compiles a parameterized :class:`~qiskit.QuantumCircuit` once into a
short program of torch operations, then runs a whole batch of parameter values at once and
returns states ``(batch, 2**n)`` or Pauli expectation values ``(batch, n_observables)``.
Everything is ordinary torch arithmetic, so gradients with respect to the parameter values
come from autograd and are exact.

Compilation:

- Instructions outside :data:`SUPPORTED_GATES` are expanded through their definitions
  (library circuits such as ``zz_feature_map`` or ``real_amplitudes`` included); parameter-free
  gates on at most two qubits (three for permutation-like gates such as ``ccx``) are applied
  through their matrix instead. :func:`decompose_to_supported` returns the expanded circuit.
- Gate angles may be any real :class:`~qiskit.circuit.ParameterExpression`. Affine ones (the
  usual ``θ``, ``2·x``, ``θ + 1``) become one matrix product over the parameter values; other
  ones (products such as the ZZ feature map's ``(π - x0)·(π - x1)``, ``sin``, ``exp``, powers)
  are evaluated in torch from their sympy form.
- Runs of diagonal and permutation gates (``rz``, ``p``, ``cp``, ``crz``, ``rzz``, ``cx``,
  ``cz``, ``swap``, ``x``, ``s``, ...) are fused into one "monomial" step, a gather and a
  multiplication by a phase vector; the other gates are applied as (batched) 2x2 / 4x4
  matrices on a reshaped view of the state.

Unsupported: measurements (anywhere, final ones included, as in
:class:`~qiskit.quantum_info.Statevector`), resets after a qubit has been acted on (resets
before any gate on that qubit are no-ops and are dropped), classical control flow, classical
bits, and opaque gates without a definition; each raises :class:`UnsupportedInstructionError`
naming the instruction and its index in the circuit.

Qubit order is qiskit's little-endian one: qubit 0 is the least significant bit of the
basis-state index, so states match :class:`~qiskit.quantum_info.Statevector` exactly (the
circuit's global phase included).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy
import torch
from qiskit import QuantumCircuit
from qiskit.circuit import (
    BoxOp,
    ControlFlowOp,
    Gate,
    Instruction,
    Parameter,
    ParameterExpression,
)
from qiskit.circuit import library as gates
from qiskit.quantum_info import Pauli, SparsePauliOp
from torch import nn

__all__ = [
    "SUPPORTED_GATES",
    "PauliObservables",
    "TorchCircuit",
    "TorchQNN",
    "UnsupportedInstructionError",
    "decompose_to_supported",
]

# Gate name -> the qiskit class it must be (a user gate that merely shares a name is expanded
# through its own definition instead).
_GATE_CLASSES: dict[str, type] = {
    "id": gates.IGate,
    "h": gates.HGate,
    "x": gates.XGate,
    "y": gates.YGate,
    "z": gates.ZGate,
    "s": gates.SGate,
    "sdg": gates.SdgGate,
    "t": gates.TGate,
    "tdg": gates.TdgGate,
    "sx": gates.SXGate,
    "sxdg": gates.SXdgGate,
    "rx": gates.RXGate,
    "ry": gates.RYGate,
    "rz": gates.RZGate,
    "p": gates.PhaseGate,
    "u1": gates.U1Gate,
    "u2": gates.U2Gate,
    "u": gates.UGate,
    "u3": gates.U3Gate,
    "cx": gates.CXGate,
    "cy": gates.CYGate,
    "cz": gates.CZGate,
    "swap": gates.SwapGate,
    "crx": gates.CRXGate,
    "cry": gates.CRYGate,
    "crz": gates.CRZGate,
    "cp": gates.CPhaseGate,
    "cu1": gates.CU1Gate,
    "rzz": gates.RZZGate,
    "rxx": gates.RXXGate,
    "ryy": gates.RYYGate,
}

#: Gates the executor applies directly (anything else is decomposed first).
SUPPORTED_GATES = frozenset(_GATE_CLASSES)

# Instructions that do nothing to a statevector.
_IGNORED = frozenset({"barrier", "delay", "id"})

# Largest parameter-free gate applied as a dense matrix, and as a permutation-with-phases.
_MAX_DENSE_QUBITS = 2
_MAX_MONOMIAL_QUBITS = 3

# A fused diagonal/permutation step keeps one log-phase row of 2**n numbers per parameter it
# depends on; past this many numbers a new step is started.
_MAX_MONOMIAL_WEIGHTS = 1 << 24

_PAULI_X = np.array([[0, 1], [1, 0]], dtype=complex)
_PAULI_Y = np.array([[0, -1j], [1j, 0]], dtype=complex)
_IDENTITY2 = np.eye(2, dtype=complex)
_PROJ0 = np.diag([1.0, 0.0]).astype(complex)
_PROJ1 = np.diag([0.0, 1.0]).astype(complex)

# Diagonal parameterized gates: log-phase per local basis index, per unit angle
# (local index = sum of qarg bits, qargs[0] least significant).
_DIAGONAL_LOG_PHASES: dict[str, np.ndarray] = {
    "rz": np.array([-0.5, 0.5]),
    "p": np.array([0.0, 1.0]),
    "u1": np.array([0.0, 1.0]),
    "crz": np.array([0.0, -0.5, 0.0, 0.5]),
    "cp": np.array([0.0, 0.0, 0.0, 1.0]),
    "cu1": np.array([0.0, 0.0, 0.0, 1.0]),
    "rzz": np.array([-0.5, 0.5, 0.5, -0.5]),
}

# Rotation gates exp(-i θ/2 G): matrix = K0 + cos(θ/2)·K1 + sin(θ/2)·K2 (local little-endian).
_ROTATIONS: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
    "rx": (np.zeros((2, 2), complex), _IDENTITY2, -1j * _PAULI_X),
    "ry": (np.zeros((2, 2), complex), _IDENTITY2, -1j * _PAULI_Y),
    # qargs (control, target): control is the low bit, so kron(target_op, control_op).
    "crx": (
        np.kron(_IDENTITY2, _PROJ0),
        np.kron(_IDENTITY2, _PROJ1),
        -1j * np.kron(_PAULI_X, _PROJ1),
    ),
    "cry": (
        np.kron(_IDENTITY2, _PROJ0),
        np.kron(_IDENTITY2, _PROJ1),
        -1j * np.kron(_PAULI_Y, _PROJ1),
    ),
    "rxx": (np.zeros((4, 4), complex), np.eye(4, dtype=complex), -1j * np.kron(_PAULI_X, _PAULI_X)),
    "ryy": (np.zeros((4, 4), complex), np.eye(4, dtype=complex), -1j * np.kron(_PAULI_Y, _PAULI_Y)),
}


class UnsupportedInstructionError(ValueError):
    """An instruction the statevector executor cannot simulate.

    ``instruction`` is the offending instruction's name and ``index`` its position in the
    top-level circuit's ``data`` (for an instruction found while expanding a composite one,
    the composite's index, with the chain of names in the message).
    """

    def __init__(self, instruction: str, index: int, reason: str, path: Sequence[str] = ()):
        self.instruction = instruction
        self.index = index
        inside = f" (inside {' -> '.join(repr(name) for name in path)})" if path else ""
        super().__init__(
            f"instruction {instruction!r} at index {index}{inside} is not supported: {reason}"
        )


# --------------------------------------------------------------------------------------------
# Flattening: every instruction -> supported gates, matrix gates or nothing.
# --------------------------------------------------------------------------------------------


@dataclass
class _FlatGate:
    """One gate after expansion: the operation, its qubit indices, and where it came from."""

    operation: Instruction
    qubits: tuple[int, ...]
    index: int
    path: tuple[str, ...]
    matrix: np.ndarray | None = None  # set for parameter-free gates applied by matrix


def _is_numeric(value: Any) -> bool:
    return not isinstance(value, ParameterExpression) or not value.parameters


def _is_basis_gate(operation: Instruction) -> bool:
    expected = _GATE_CLASSES.get(operation.name)
    if expected is None or not isinstance(operation, expected):
        return False
    ctrl_state = getattr(operation, "ctrl_state", None)
    num_ctrl = getattr(operation, "num_ctrl_qubits", 0)
    return ctrl_state is None or ctrl_state == (1 << num_ctrl) - 1


def _gate_matrix(operation: Instruction) -> np.ndarray | None:
    """The gate's unitary when it is parameter-free, small and has a known matrix."""
    if not isinstance(operation, Gate) or operation.num_qubits > _MAX_MONOMIAL_QUBITS:
        return None
    if not all(_is_numeric(value) for value in operation.params):
        return None
    try:
        matrix = np.asarray(operation.to_matrix(), dtype=complex)
    except Exception:  # opaque or matrix-less gates are expanded through definitions instead
        return None
    if operation.num_qubits > _MAX_DENSE_QUBITS and _monomial_parts(matrix) is None:
        return None
    return matrix


def _flatten(circuit: QuantumCircuit, *, use_matrices: bool) -> tuple[list[_FlatGate], list[Any]]:
    """Expand ``circuit`` into gates the executor applies, plus its global-phase terms."""
    gates_out: list[_FlatGate] = []
    phases: list[Any] = [circuit.global_phase]
    touched = [False] * circuit.num_qubits

    def visit(
        operation: Instruction,
        qubits: tuple[int, ...],
        clbits: tuple[int, ...],
        index: int,
        path: tuple[str, ...],
    ) -> None:
        name = operation.name
        if len(path) > 64:
            raise UnsupportedInstructionError(name, index, "definitions nest too deeply", path)
        if isinstance(operation, BoxOp):
            body = operation.blocks[0]
            visit_circuit(body, qubits, index, (*path, name))
            return
        if isinstance(operation, ControlFlowOp):
            raise UnsupportedInstructionError(
                name, index, "classical control flow cannot be simulated as a statevector", path
            )
        if getattr(operation, "condition", None) is not None:
            raise UnsupportedInstructionError(
                name, index, "classically conditioned instructions are not supported", path
            )
        if name == "measure":
            raise UnsupportedInstructionError(
                name,
                index,
                "measurements are not unitary; remove them (for example with "
                "QuantumCircuit.remove_final_measurements()) before simulating",
                path,
            )
        if name == "reset":
            if any(touched[q] for q in qubits):
                raise UnsupportedInstructionError(
                    name, index, "a reset after a qubit has been acted on is not unitary", path
                )
            return  # the qubit is still |0>: the reset does nothing
        if name in _IGNORED:
            return
        if name == "global_phase" and not qubits:
            phases.append(operation.params[0])
            return
        if clbits:
            raise UnsupportedInstructionError(
                name, index, "instructions on classical bits are not supported", path
            )
        if _is_basis_gate(operation):
            matrix = _gate_matrix(operation) if use_matrices else None
            gates_out.append(_FlatGate(operation, qubits, index, path, matrix))
            for q in qubits:
                touched[q] = True
            return
        if use_matrices:
            matrix = _gate_matrix(operation)
            if matrix is not None:
                gates_out.append(_FlatGate(operation, qubits, index, path, matrix))
                for q in qubits:
                    touched[q] = True
                return
        definition = getattr(operation, "definition", None)
        if definition is None:
            raise UnsupportedInstructionError(
                name,
                index,
                f"it is not one of the supported gates ({', '.join(sorted(SUPPORTED_GATES))}) "
                "and has no definition to decompose into them",
                path,
            )
        phases.append(definition.global_phase)
        visit_circuit(definition, qubits, index, (*path, name))

    def visit_circuit(
        body: QuantumCircuit, qubits: tuple[int, ...], index: int, path: tuple[str, ...]
    ) -> None:
        qubit_map = {bit: qubits[i] for i, bit in enumerate(body.qubits)}
        clbit_map = {bit: i for i, bit in enumerate(body.clbits)}
        for instruction in body.data:
            visit(
                instruction.operation,
                tuple(qubit_map[q] for q in instruction.qubits),
                tuple(clbit_map[c] for c in instruction.clbits),
                index,
                path,
            )

    for position, instruction in enumerate(circuit.data):
        visit(
            instruction.operation,
            tuple(circuit.find_bit(q).index for q in instruction.qubits),
            tuple(circuit.find_bit(c).index for c in instruction.clbits),
            position,
            (),
        )
    return gates_out, phases


def decompose_to_supported(circuit: QuantumCircuit) -> QuantumCircuit:
    """``circuit`` expanded (recursively, through definitions) into :data:`SUPPORTED_GATES`.

    Parameter expressions and the global phase are kept; barriers, delays and identities are
    dropped, and so are resets on qubits nothing has acted on yet (they are no-ops). Raises
    :class:`UnsupportedInstructionError` for what the executor cannot simulate.
    """
    flat, phases = _flatten(circuit, use_matrices=False)
    global_phase: Any = 0.0
    for phase in phases:
        global_phase = global_phase + phase
    out = QuantumCircuit(circuit.num_qubits, name=circuit.name, global_phase=global_phase)
    for gate in flat:
        out.append(gate.operation, [out.qubits[q] for q in gate.qubits], copy=False)
    return out


# --------------------------------------------------------------------------------------------
# Parameter expressions -> affine maps over "features" (parameters + non-linear terms).
# --------------------------------------------------------------------------------------------

_SYMPY_FUNCTIONS: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    sympy.sin: torch.sin,
    sympy.cos: torch.cos,
    sympy.tan: torch.tan,
    sympy.asin: torch.asin,
    sympy.acos: torch.acos,
    sympy.atan: torch.atan,
    sympy.sinh: torch.sinh,
    sympy.cosh: torch.cosh,
    sympy.tanh: torch.tanh,
    sympy.exp: torch.exp,
    sympy.log: torch.log,
    sympy.Abs: torch.abs,
    sympy.sign: torch.sign,
}

_Evaluator = Callable[[torch.Tensor], "torch.Tensor | float"]


def _real_number(value: Any, what: str) -> float:
    number = complex(value)
    if abs(number.imag) > 1e-12 * max(1.0, abs(number.real)):
        raise ValueError(f"{what} is complex ({number}); gate angles must be real")
    return number.real


def _sympy_to_torch(node: sympy.Expr, columns: dict[str, int], what: str) -> _Evaluator:
    """A function of the parameter values ``(batch, n_params)`` evaluating ``node`` in torch."""
    if not node.free_symbols:
        constant = _real_number(node, what)
        return lambda values: constant
    if node.is_Symbol:
        column = columns[node.name]
        return lambda values: values[:, column]
    if node.is_Add or node.is_Mul:
        terms = [_sympy_to_torch(arg, columns, what) for arg in node.args]
        if node.is_Add:

            def add(values: torch.Tensor) -> torch.Tensor | float:
                total = terms[0](values)
                for term in terms[1:]:
                    total = total + term(values)
                return total

            return add

        def multiply(values: torch.Tensor) -> torch.Tensor | float:
            total = terms[0](values)
            for term in terms[1:]:
                total = total * term(values)
            return total

        return multiply
    if node.is_Pow:
        base = _sympy_to_torch(node.base, columns, what)
        if not node.exp.free_symbols:
            exponent = _real_number(node.exp, what)
            if exponent == 0.5:
                return lambda values: torch.sqrt(base(values))
            return lambda values: torch.pow(base(values), exponent)
        power = _sympy_to_torch(node.exp, columns, what)
        return lambda values: torch.pow(base(values), power(values))
    if isinstance(node, sympy.conjugate | sympy.re):  # parameters are real
        return _sympy_to_torch(node.args[0], columns, what)
    if isinstance(node, sympy.im):
        return lambda values: 0.0
    function = _SYMPY_FUNCTIONS.get(node.func)
    if function is not None and len(node.args) == 1:
        inner = _sympy_to_torch(node.args[0], columns, what)
        return lambda values: function(torch.as_tensor(inner(values), dtype=values.dtype))
    raise ValueError(f"{what}: cannot evaluate {node.func.__name__} in torch")


@dataclass
class _Affine:
    """``angle = sum(coefficients[f] * feature_f) + constant`` over the feature columns."""

    coefficients: dict[int, float] = field(default_factory=dict)
    constant: float = 0.0

    def plus(self, other: _Affine) -> _Affine:
        merged = dict(self.coefficients)
        for key, value in other.coefficients.items():
            merged[key] = merged.get(key, 0.0) + value
        return _Affine(merged, self.constant + other.constant)


class _Features:
    """Maps gate parameters to affine functions of the parameter values and non-linear terms.

    Feature columns ``0 .. n_params - 1`` are the parameter values; each distinct non-linear
    expression adds one column, computed by a torch evaluator.
    """

    def __init__(self, parameters: Sequence[Parameter]):
        self.positions = {param: i for i, param in enumerate(parameters)}
        self.num_parameters = len(parameters)
        self.nonlinear: list[_Evaluator] = []
        self._nonlinear_columns: dict[Any, int] = {}

    @property
    def size(self) -> int:
        return self.num_parameters + len(self.nonlinear)

    def _position(self, param: Parameter, what: str) -> int:
        try:
            return self.positions[param]
        except KeyError:
            raise ValueError(
                f"{what} depends on parameter {param.name!r}, which is not in the parameter list"
            ) from None

    def affine(self, value: Any, what: str) -> _Affine:
        """The angle ``value`` (number or expression) as an affine map over the features."""
        if not isinstance(value, ParameterExpression):
            return _Affine({}, _real_number(value, what))
        params = value.parameters
        if not params:
            return _Affine({}, _real_number(value.sympify(), what))
        if isinstance(value, Parameter):
            return _Affine({self._position(value, what): 1.0}, 0.0)
        coefficients: dict[int, float] = {}
        for param in params:
            try:
                slope = value.gradient(param)
            except Exception:  # not differentiable symbolically (abs, sign, ...)
                return self._nonlinear(value, what)
            if isinstance(slope, ParameterExpression):
                if slope.parameters:
                    return self._nonlinear(value, what)
                slope = slope.sympify()
            slope = _real_number(slope, what)
            if slope != 0.0:
                coefficients[self._position(param, what)] = slope
        constant = value.bind({param: 0.0 for param in params})
        return _Affine(coefficients, _real_number(constant, what))

    def _nonlinear(self, value: ParameterExpression, what: str) -> _Affine:
        expression = value.sympify()
        column = self._nonlinear_columns.get(expression)
        if column is None:
            columns = {param.name: self._position(param, what) for param in value.parameters}
            self.nonlinear.append(_sympy_to_torch(expression, columns, what))
            column = self.size - 1
            self._nonlinear_columns[expression] = column
        return _Affine({column: 1.0}, 0.0)

    def evaluate(self, values: torch.Tensor) -> torch.Tensor:
        """Feature matrix ``(batch, size)`` from parameter values ``(batch, n_params)``."""
        if not self.nonlinear:
            return values
        extra = [
            torch.as_tensor(evaluate(values), dtype=values.dtype, device=values.device).expand(
                values.shape[0]
            )
            for evaluate in self.nonlinear
        ]
        return torch.cat([values, torch.stack(extra, dim=1)], dim=1)


# --------------------------------------------------------------------------------------------
# Index helpers (little-endian: qubit q is bit q of the basis-state index).
# --------------------------------------------------------------------------------------------


def _local_index(indices: np.ndarray, qubits: Sequence[int]) -> np.ndarray:
    """Index into a gate's local basis (qargs[0] least significant) for each global index."""
    local = np.zeros_like(indices)
    for position, qubit in enumerate(qubits):
        local |= ((indices >> qubit) & 1) << position
    return local


def _with_local_bits(indices: np.ndarray, qubits: Sequence[int], local: np.ndarray) -> np.ndarray:
    """Global indices with the ``qubits`` bits replaced by the bits of ``local``."""
    out = indices.copy()
    for position, qubit in enumerate(qubits):
        out &= ~(1 << qubit)
        out |= ((local >> position) & 1) << qubit
    return out


def _parity(values: np.ndarray) -> np.ndarray:
    """Parity (0/1) of the set bits of each non-negative integer."""
    parity = np.zeros_like(values)
    remaining = values.copy()
    while np.any(remaining):
        parity ^= remaining & 1
        remaining >>= 1
    return parity


def _monomial_parts(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(source, factor)`` with ``(M v)[i] = factor[i] * v[source[i]]``, or None if M is not
    a permutation times a diagonal."""
    nonzero = np.abs(matrix) > 1e-12
    if not np.all(nonzero.sum(axis=1) == 1) or not np.all(nonzero.sum(axis=0) == 1):
        return None
    source = nonzero.argmax(axis=1)
    return source, matrix[np.arange(matrix.shape[0]), source]


# --------------------------------------------------------------------------------------------
# Compiled program.
# --------------------------------------------------------------------------------------------


class _Monomial:
    """Accumulates consecutive diagonal/permutation gates: ``out[i] = f[i] * in[source[i]]``
    with ``f = exp(i * (features @ weights + constant))``."""

    def __init__(self, dimension: int):
        self.source = np.arange(dimension, dtype=np.int64)
        self.weights: dict[int, np.ndarray] = {}
        self.constant = np.zeros(dimension)
        self.empty = True

    def permute(self, source: np.ndarray) -> None:
        self.source = self.source[source]
        self.constant = self.constant[source]
        self.weights = {key: row[source] for key, row in self.weights.items()}
        self.empty = False

    def add_phase(self, affine: _Affine, pattern: np.ndarray) -> None:
        """Multiply by ``exp(i * angle * pattern)`` for an affine ``angle``."""
        for key, coefficient in affine.coefficients.items():
            row = self.weights.get(key)
            self.weights[key] = (
                coefficient * pattern if row is None else row + coefficient * pattern
            )
        self.constant = self.constant + affine.constant * pattern
        self.empty = False

    def add_constant(self, log_phase: np.ndarray) -> None:
        """Multiply by the constant ``exp(i * log_phase)``."""
        self.constant = self.constant + log_phase
        self.empty = False


@dataclass
class _Step:
    """One state update: a fused monomial step or a dense 1-/2-qubit matrix."""

    kind: str  # "monomial", "dense_const", "full_const", "rot1", "rot2", "u"
    qubits: tuple[int, ...] = ()  # dense: (qubit,) or (high, low)
    slot: int = -1  # parameterized: index within its kind's group / monomial phase slot
    source: np.ndarray | None = None  # monomial: gather indices (None: identity)
    factor: np.ndarray | None = None  # monomial constant factor (None: parameterized or ones)
    # dense_const: (2, 2) or (2, 2, 2, 2) [o_hi, o_lo, i_hi, i_lo]; full_const: (2**n, 2**n)
    matrix: np.ndarray | None = None


def _two_qubit_layout(matrix: np.ndarray, qubits: Sequence[int]) -> tuple[np.ndarray, int, int]:
    """A local 4x4 gate matrix (qargs[0] low bit) as ``[o_hi, o_lo, i_hi, i_lo]``."""
    tensor = matrix.reshape(*matrix.shape[:-2], 2, 2, 2, 2)
    q0, q1 = qubits
    if q1 > q0:
        return tensor, q1, q0
    return tensor.swapaxes(-4, -3).swapaxes(-2, -1), q0, q1


class _DeviceCache:
    """Torch copies of numpy constants, made once per (device, dtype)."""

    def __init__(self, arrays: Callable[[], dict[str, Any]]):
        self._arrays = arrays
        self._tensors: dict[tuple[torch.device, torch.dtype], dict[str, Any]] = {}

    def get(self, device: torch.device, complex_dtype: torch.dtype) -> dict[str, Any]:
        key = (device, complex_dtype)
        tensors = self._tensors.get(key)
        if tensors is None:
            real_dtype = torch.empty(0, dtype=complex_dtype).real.dtype
            tensors = {}
            for name, value in self._arrays().items():
                tensors[name] = _to_tensor(value, device, real_dtype, complex_dtype)
            self._tensors[key] = tensors
        return tensors


def _to_tensor(value: Any, device: torch.device, real: torch.dtype, cplx: torch.dtype) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_to_tensor(item, device, real, cplx) for item in value]
    array = np.array(value)  # a private, writable copy
    if array.dtype.kind in "iu":
        return torch.as_tensor(array, dtype=torch.long, device=device)
    if array.dtype.kind == "c":
        return torch.as_tensor(array, dtype=cplx, device=device)
    return torch.as_tensor(array, dtype=real, device=device)


def _as_complex_dtype(dtype: torch.dtype) -> torch.dtype:
    mapping = {
        torch.complex128: torch.complex128,
        torch.float64: torch.complex128,
        torch.complex64: torch.complex64,
        torch.float32: torch.complex64,
    }
    if dtype not in mapping:
        raise ValueError(f"dtype must be complex128/float64 or complex64/float32, got {dtype}")
    return mapping[dtype]


class TorchCircuit:
    """A qiskit circuit compiled into batched torch statevector operations.

    Args:
        circuit: The circuit (unitary; see the module docstring for what is rejected).
        parameters: The order of the columns of the parameter values passed to
            :meth:`state` / :meth:`expectation_values`. Defaults to ``circuit.parameters``.
            Every circuit parameter must be in it; extra ones are allowed (zero gradient).
        dtype: ``torch.complex128`` (default; ``torch.float64`` means the same) or
            ``torch.complex64`` (``torch.float32``). Parameter values are cast to the
            matching real dtype.

    The device follows the parameter values passed in (constants are copied to each device
    once).
    """

    def __init__(
        self,
        circuit: QuantumCircuit,
        parameters: Iterable[Parameter] | None = None,
        *,
        dtype: torch.dtype = torch.complex128,
    ):
        self.num_qubits = int(circuit.num_qubits)
        self.parameters: tuple[Parameter, ...] = tuple(
            circuit.parameters if parameters is None else parameters
        )
        if len(set(self.parameters)) != len(self.parameters):
            raise ValueError("parameters must not repeat")
        known = set(self.parameters)
        missing = [p.name for p in circuit.parameters if p not in known]
        if missing:
            raise ValueError(f"circuit parameters missing from the parameter list: {missing}")
        self.dtype = _as_complex_dtype(dtype)
        self.real_dtype = torch.empty(0, dtype=self.dtype).real.dtype
        self._features = _Features(self.parameters)
        self._compile(circuit)

    @property
    def num_parameters(self) -> int:
        """Number of parameter-value columns expected."""
        return len(self.parameters)

    # -- compilation ----------------------------------------------------------------------

    def _compile(self, circuit: QuantumCircuit) -> None:
        n = self.num_qubits
        dimension = 1 << n
        indices = np.arange(dimension, dtype=np.int64)
        flat, phases = _flatten(circuit, use_matrices=True)
        features = self._features

        steps: list[_Step] = []
        monomial_weights: list[tuple[dict[int, np.ndarray], np.ndarray]] = []
        dense_angles: list[_Affine] = []
        rotations: dict[str, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = {
            "rot1": [],
            "rot2": [],
        }
        u_gates: list[int] = []  # first of three dense-angle columns per u gate
        block = _Monomial(dimension)

        def flush() -> None:
            nonlocal block
            if block.empty:
                return
            identity = np.array_equal(block.source, indices)
            source = None if identity else block.source
            if block.weights:
                slot = len(monomial_weights)
                monomial_weights.append((block.weights, block.constant))
                steps.append(_Step("monomial", slot=slot, source=source))
            else:
                factor = np.exp(1j * block.constant)
                if np.allclose(factor, 1.0, rtol=0, atol=1e-15):
                    factor = None
                if source is not None or factor is not None:
                    steps.append(_Step("monomial", source=source, factor=factor))
            block = _Monomial(dimension)

        for gate in flat:
            op, qubits = gate.operation, gate.qubits
            what = f"parameter of {op.name!r} at index {gate.index}"
            if gate.matrix is not None:
                parts = _monomial_parts(gate.matrix)
                if parts is not None:
                    local_source, local_factor = parts
                    local = _local_index(indices, qubits)
                    block.permute(_with_local_bits(indices, qubits, local_source[local]))
                    block.add_constant(np.angle(local_factor)[local])
                    continue
                flush()
                if len(qubits) == 1:
                    steps.append(_Step("dense_const", qubits=qubits, matrix=gate.matrix))
                else:
                    tensor, high, low = _two_qubit_layout(gate.matrix, qubits)
                    steps.append(_Step("dense_const", qubits=(high, low), matrix=tensor))
                continue
            name = op.name
            if name in _DIAGONAL_LOG_PHASES:
                affine = features.affine(op.params[0], what)
                pattern = _DIAGONAL_LOG_PHASES[name][_local_index(indices, qubits)]
                extra_rows = len(set(affine.coefficients) - set(block.weights))
                if (len(block.weights) + extra_rows) * dimension > _MAX_MONOMIAL_WEIGHTS:
                    flush()
                block.add_phase(affine, pattern)
                continue
            flush()
            if name in _ROTATIONS:
                k0, k1, k2 = _ROTATIONS[name]
                column = len(dense_angles)
                dense_angles.append(features.affine(op.params[0], what))
                if len(qubits) == 1:
                    rotations["rot1"].append((column, k0, k1, k2))
                    steps.append(_Step("rot1", qubits=qubits, slot=len(rotations["rot1"]) - 1))
                else:
                    k0, high, low = _two_qubit_layout(k0, qubits)
                    k1, _, _ = _two_qubit_layout(k1, qubits)
                    k2, _, _ = _two_qubit_layout(k2, qubits)
                    rotations["rot2"].append((column, k0, k1, k2))
                    steps.append(_Step("rot2", qubits=(high, low), slot=len(rotations["rot2"]) - 1))
                continue
            if name in ("u", "u3", "u2"):
                if name == "u2":
                    theta, phi, lam = math.pi / 2, op.params[0], op.params[1]
                else:
                    theta, phi, lam = op.params
                u_gates.append(len(dense_angles))
                for value in (theta, phi, lam):
                    dense_angles.append(features.affine(value, what))
                steps.append(_Step("u", qubits=qubits, slot=len(u_gates) - 1))
                continue
            raise UnsupportedInstructionError(  # pragma: no cover - guarded by _flatten
                name, gate.index, "no simulation rule for this gate", gate.path
            )
        flush()

        global_phase = _Affine()
        for phase in phases:
            global_phase = global_phase.plus(features.affine(phase, "global phase"))

        self._steps, self._initial_state = _fold_constant_steps(steps, n)
        self._num_features = features.size
        self._has_global_phase = bool(global_phase.coefficients) or global_phase.constant != 0.0
        self._arrays = self._constant_arrays(
            monomial_weights, dense_angles, rotations, u_gates, global_phase
        )
        self._cache = _DeviceCache(lambda: self._arrays)

    def _constant_arrays(
        self,
        monomial_weights: list[tuple[dict[int, np.ndarray], np.ndarray]],
        dense_angles: list[_Affine],
        rotations: dict[str, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]],
        u_gates: list[int],
        global_phase: _Affine,
    ) -> dict[str, Any]:
        size = self._features.size
        dimension = 1 << self.num_qubits
        arrays: dict[str, Any] = {}

        def affine_matrix(affines: Sequence[_Affine]) -> tuple[np.ndarray, np.ndarray]:
            matrix = np.zeros((size, len(affines)))
            offset = np.zeros(len(affines))
            for column, affine in enumerate(affines):
                for row, coefficient in affine.coefficients.items():
                    matrix[row, column] += coefficient
                offset[column] = affine.constant
            return matrix, offset

        # Parameterized monomial steps share one matrix product for their log-phases, in
        # groups whose matrix (rows used x steps x 2**n) stays under _MAX_MONOMIAL_WEIGHTS.
        groups: list[list[int]] = []
        group_rows: set[int] = set()
        for slot, (rows, _) in enumerate(monomial_weights):
            merged = group_rows | set(rows)
            if groups and len(merged) * (len(groups[-1]) + 1) * dimension <= _MAX_MONOMIAL_WEIGHTS:
                groups[-1].append(slot)
                group_rows = merged
            else:
                groups.append([slot])
                group_rows = set(rows)
        arrays["phase_groups"] = []
        for slots in groups:
            used = sorted({row for slot in slots for row in monomial_weights[slot][0]})
            weights = np.zeros((len(used), len(slots) * dimension))
            constant = np.zeros(len(slots) * dimension)
            for position, slot in enumerate(slots):
                rows, offset = monomial_weights[slot]
                columns = slice(position * dimension, (position + 1) * dimension)
                for row_position, row in enumerate(used):
                    if row in rows:
                        weights[row_position, columns] = rows[row]
                constant[columns] = offset
            arrays["phase_groups"].append([np.asarray(used, dtype=np.int64), weights, constant])
        if dense_angles:
            arrays["angle_matrix"], arrays["angle_offset"] = affine_matrix(dense_angles)
        for kind, entries in rotations.items():
            if entries:
                arrays[f"{kind}_columns"] = np.asarray([e[0] for e in entries], dtype=np.int64)
                for position, key in ((1, "k0"), (2, "k1"), (3, "k2")):
                    stacked = np.stack([e[position] for e in entries]).astype(complex)
                    if key == "k0" and not np.any(stacked):
                        arrays[f"{kind}_{key}"] = None
                    else:
                        arrays[f"{kind}_{key}"] = stacked.reshape(len(entries), -1)
        if u_gates:
            arrays["u_columns"] = np.asarray(u_gates, dtype=np.int64)
        global_matrix, global_offset = affine_matrix([global_phase])
        arrays["global_matrix"], arrays["global_offset"] = global_matrix, global_offset
        arrays["initial_state"] = self._initial_state
        arrays["sources"] = [step.source for step in self._steps]
        arrays["factors"] = [step.factor for step in self._steps]
        arrays["matrices"] = [step.matrix for step in self._steps]
        return arrays

    # -- execution ------------------------------------------------------------------------

    def _prepare(self, values: Any, device: torch.device | str | None) -> tuple[torch.Tensor, bool]:
        if isinstance(values, torch.Tensor):
            tensor = values.to(device=device or values.device, dtype=self.real_dtype)
        elif values is None:
            tensor = torch.zeros(0, dtype=self.real_dtype, device=device)
        else:
            tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
            tensor = tensor.to(self.real_dtype)
        original_shape = tuple(tensor.shape)
        single = tensor.dim() <= 1
        if tensor.dim() == 0 or (tensor.dim() == 1 and tensor.numel() == 0):
            tensor = tensor.reshape(1, 0) if tensor.numel() == 0 else tensor.reshape(1, 1)
        elif tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 2 or tensor.shape[1] != self.num_parameters:
            raise ValueError(
                f"expected parameter values of shape (batch, {self.num_parameters}) or "
                f"({self.num_parameters},), got shape {original_shape}"
            )
        return tensor, single

    def _evolve(self, values: torch.Tensor, include_global_phase: bool) -> torch.Tensor:
        batch = values.shape[0]
        n = self.num_qubits
        dimension = 1 << n
        consts = self._cache.get(values.device, self.dtype)
        features = self._features.evaluate(values)

        mats: dict[str, tuple[torch.Tensor, ...]] = {}
        if "angle_matrix" in consts:
            angles = torch.addmm(consts["angle_offset"], features, consts["angle_matrix"])
            for kind, size in (("rot1", 2), ("rot2", 4)):
                if f"{kind}_columns" not in consts:
                    continue
                half = angles[:, consts[f"{kind}_columns"]] * 0.5
                cos = torch.cos(half).unsqueeze(-1)
                sin = torch.sin(half).unsqueeze(-1)
                matrix = cos * consts[f"{kind}_k1"] + sin * consts[f"{kind}_k2"]
                if consts[f"{kind}_k0"] is not None:
                    matrix = matrix + consts[f"{kind}_k0"]
                mats[kind] = matrix.reshape(batch, -1, size, size).unbind(1)
            if "u_columns" in consts:
                first = consts["u_columns"]
                theta, phi, lam = angles[:, first], angles[:, first + 1], angles[:, first + 2]
                cos = torch.cos(theta * 0.5).to(self.dtype)
                sin = torch.sin(theta * 0.5).to(self.dtype)
                e_phi = _unit_phase(phi)
                e_lam = _unit_phase(lam)
                entries = [cos, -e_lam * sin, e_phi * sin, e_phi * e_lam * cos]
                mats["u"] = torch.stack(entries, dim=-1).reshape(batch, -1, 2, 2).unbind(1)
        phase_factors: list[torch.Tensor] = []
        for rows, weights, constant in consts["phase_groups"]:
            phases = torch.addmm(constant, features[:, rows], weights)
            phase_factors.extend(_unit_phase(phases).reshape(batch, -1, dimension).unbind(1))

        state = consts["initial_state"].expand(batch, dimension).contiguous()
        sources, factors, matrices = consts["sources"], consts["factors"], consts["matrices"]
        for position, step in enumerate(self._steps):
            kind = step.kind
            if kind == "monomial" and step.slot >= 0:
                source = sources[position]
                if source is not None:
                    state = state.index_select(1, source)
                state = state * phase_factors[step.slot]
            elif kind in _CONSTANT_KINDS:
                state = _apply_constant(
                    state, step, sources[position], factors[position], matrices[position], n
                )
            else:
                matrix = mats[kind][step.slot]
                state = _apply_matrix(state, matrix, step.qubits, n, batched=True)
        if include_global_phase and self._has_global_phase:
            phase = torch.addmm(consts["global_offset"], features, consts["global_matrix"])
            state = state * _unit_phase(phase)
        return state

    def state(
        self,
        values: Any = None,
        *,
        device: torch.device | str | None = None,
        include_global_phase: bool = True,
    ) -> torch.Tensor:
        """Statevectors ``(batch, 2**n)`` for parameter values ``(batch, n_params)``.

        A 1-D ``values`` gives one state ``(2**n,)``; ``None`` is allowed for a circuit without
        parameters. Non-tensor values are put on ``device`` (default CPU); tensors stay on
        theirs unless ``device`` is given.
        """
        tensor, single = self._prepare(values, device)
        state = self._evolve(tensor, include_global_phase)
        return state[0] if single else state

    def expectation_values(
        self,
        values: Any,
        observables: PauliObservables | SparsePauliOp | Sequence[Any],
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Real expectation values ``(batch, n_observables)`` (``(n_observables,)`` for 1-D
        values) of Pauli-sum observables, differentiable with respect to ``values``."""
        if not isinstance(observables, PauliObservables):
            observables = PauliObservables(observables, self.num_qubits)
        tensor, single = self._prepare(values, device)
        result = observables.expectation(self._evolve(tensor, include_global_phase=False))
        return result[0] if single else result


def _unit_phase(angle: torch.Tensor) -> torch.Tensor:
    """``exp(i * angle)`` for a real tensor (cheaper than a complex ``exp``)."""
    return torch.complex(torch.cos(angle), torch.sin(angle))


_CONSTANT_KINDS = frozenset({"monomial", "dense_const", "full_const"})

# Up to this many qubits, a run of constant steps is folded into one 2**n x 2**n matrix.
_FULL_MATRIX_QUBITS = 6


def _is_constant(step: _Step) -> bool:
    return step.kind in _CONSTANT_KINDS and (step.kind != "monomial" or step.slot < 0)


def _apply_constant(
    state: torch.Tensor,
    step: _Step,
    source: torch.Tensor | None,
    factor: torch.Tensor | None,
    matrix: torch.Tensor | None,
    n: int,
) -> torch.Tensor:
    """Apply a parameter-free step (tensors already on the state's device and dtype)."""
    if step.kind == "monomial":
        if source is not None:
            state = state.index_select(1, source)
        return state if factor is None else state * factor
    if step.kind == "full_const":
        return state @ matrix
    return _apply_matrix(state, matrix, step.qubits, n, batched=False)


def _run_constant_steps(steps: Sequence[_Step], states: np.ndarray, n: int) -> np.ndarray:
    """Apply parameter-free steps to rows of ``states`` in numpy precision (complex128)."""
    tensor = torch.as_tensor(states, dtype=torch.complex128)
    for step in steps:

        def constant(value: np.ndarray | None) -> torch.Tensor | None:
            return None if value is None else torch.as_tensor(value)

        tensor = _apply_constant(
            tensor,
            step,
            constant(step.source),
            None if step.factor is None else constant(step.factor.astype(complex)),
            None if step.matrix is None else constant(step.matrix.astype(complex)),
            n,
        )
    return tensor.numpy()


def _fold_constant_steps(steps: list[_Step], n: int) -> tuple[list[_Step], np.ndarray]:
    """Fold the parameter-free prefix into the initial state and, on few qubits, each run of
    parameter-free steps into one full matrix."""
    dimension = 1 << n
    initial = np.zeros((1, dimension), dtype=complex)
    initial[0, 0] = 1.0
    start = 0
    while start < len(steps) and _is_constant(steps[start]):
        start += 1
    initial = _run_constant_steps(steps[:start], initial, n)[0]
    folded: list[_Step] = []
    position = start
    while position < len(steps):
        end = position
        while end < len(steps) and _is_constant(steps[end]):
            end += 1
        if end - position >= 2 and n <= _FULL_MATRIX_QUBITS:
            # rows of the result are U e_j, so ``state @ result`` applies U to row states
            matrix = _run_constant_steps(steps[position:end], np.eye(dimension, dtype=complex), n)
            folded.append(_Step("full_const", matrix=matrix))
            position = end
        else:
            folded.append(steps[position])
            position += 1
    return folded, initial


def _apply_matrix(
    state: torch.Tensor,
    matrix: torch.Tensor,
    qubits: tuple[int, ...],
    n: int,
    *,
    batched: bool,
) -> torch.Tensor:
    """Apply a 1-qubit ``(2, 2)`` or 2-qubit ``(2, 2, 2, 2)`` gate (batched: leading batch
    axis) to ``state`` ``(batch, 2**n)``; 2-qubit qubits are ``(high, low)``."""
    batch = state.shape[0]
    if len(qubits) == 1:
        (qubit,) = qubits
        outer, inner = 1 << (n - 1 - qubit), 1 << qubit
        if inner == 1:  # (batch, outer, 2) @ M^T
            out = torch.matmul(state.view(batch, outer, 2), matrix.transpose(-1, -2))
        elif outer == 1:  # M @ (batch, 2, inner)
            out = torch.matmul(matrix, state.view(batch, 2, inner))
        elif batched and outer > inner:
            # Broadcasting M over ``outer`` would copy it to the state's size: move the gate
            # axis first and do one matrix product per batch row instead.
            view = state.view(batch, outer, 2, inner).transpose(1, 2).reshape(batch, 2, -1)
            out = torch.bmm(matrix, view).view(batch, 2, outer, inner).transpose(1, 2)
        elif batched:
            out = torch.matmul(matrix.unsqueeze(1), state.view(batch, outer, 2, inner))
        else:
            out = torch.matmul(matrix, state.view(batch, outer, 2, inner))
        return out.reshape(batch, -1)
    high, low = qubits
    view = state.view(batch, 1 << (n - 1 - high), 2, 1 << (high - low - 1), 2, 1 << low)
    if batched:
        tensor = matrix.reshape(batch, 2, 2, 2, 2)
        out = torch.einsum("bxyuv,baucvd->baxcyd", tensor, view)
    else:
        out = torch.einsum("xyuv,baucvd->baxcyd", matrix.reshape(2, 2, 2, 2), view)
    return out.reshape(batch, -1)


# --------------------------------------------------------------------------------------------
# Observables.
# --------------------------------------------------------------------------------------------


def _as_sparse_pauli_op(observable: Any) -> SparsePauliOp:
    if isinstance(observable, SparsePauliOp):
        return observable
    if isinstance(observable, Pauli | str):
        return SparsePauliOp(observable)
    if isinstance(observable, dict):
        labels, coeffs = zip(*observable.items(), strict=True) if observable else ((), ())
        return SparsePauliOp(list(labels), np.asarray(coeffs, dtype=complex))
    return SparsePauliOp(observable)


class PauliObservables:
    """Pauli-sum observables compiled for fast expectation values of batched statevectors.

    Terms are grouped by their X/Y bit-flip mask: the diagonal group (only I/Z) is one matrix
    product of the probabilities with a sign table; every other group is a gather of the
    flipped amplitudes, a product with the conjugate state, and a matrix product with the
    group's phase/sign table.

    Args:
        observables: ``SparsePauliOp`` / ``Pauli`` / label / ``{label: coeff}``, or a sequence
            of them (a single one is treated as a sequence of one).
        num_qubits: The circuit's qubit count (every observable must match it).
    """

    def __init__(self, observables: Any, num_qubits: int):
        if isinstance(observables, SparsePauliOp | Pauli | str | dict):
            observables = [observables]
        operators = [_as_sparse_pauli_op(observable) for observable in observables]
        self.num_qubits = int(num_qubits)
        self.num_observables = len(operators)
        dimension = 1 << self.num_qubits
        indices = np.arange(dimension, dtype=np.int64)
        groups: dict[int, np.ndarray] = {}
        for column, operator in enumerate(operators):
            if operator.num_qubits != self.num_qubits:
                raise ValueError(
                    f"observable {column} acts on {operator.num_qubits} qubits, "
                    f"the circuit has {self.num_qubits}"
                )
            x_bits = operator.paulis.x
            z_bits = operator.paulis.z
            weights = 1 << np.arange(self.num_qubits, dtype=np.int64)
            x_masks = (x_bits * weights).sum(axis=1)
            z_masks = (z_bits * weights).sum(axis=1)
            num_y = (x_bits & z_bits).sum(axis=1)
            factors = operator.coeffs * (-1j) ** operator.paulis.phase * 1j**num_y
            for x_mask, z_mask, factor in zip(x_masks, z_masks, factors, strict=True):
                if factor == 0:
                    continue
                table = groups.get(int(x_mask))
                if table is None:
                    table = groups[int(x_mask)] = np.zeros((dimension, len(operators)), complex)
                signs = 1.0 - 2.0 * _parity((indices ^ x_mask) & z_mask)
                table[:, column] += factor * signs
        diagonal = groups.pop(0, None)
        self._x_masks = sorted(groups)
        arrays: dict[str, Any] = {
            "diagonal": None if diagonal is None else diagonal,
            "diagonal_real": None if diagonal is None else diagonal.real.copy(),
            "flips": [indices ^ mask for mask in self._x_masks],
            "tables": [groups[mask] for mask in self._x_masks],
        }
        self._cache = _DeviceCache(lambda: arrays)

    def expectation(self, state: torch.Tensor) -> torch.Tensor:
        """Real parts of ``<ψ|O_k|ψ>`` for states ``(batch, 2**n)`` -> ``(batch, n_obs)``."""
        consts = self._cache.get(state.device, state.dtype)
        batch = state.shape[0]
        result = None
        if consts["diagonal_real"] is not None:
            probabilities = torch.view_as_real(state).square().sum(-1)
            result = probabilities @ consts["diagonal_real"]
        if consts["flips"]:
            conjugate = state.conj()
            for flip, table in zip(consts["flips"], consts["tables"], strict=True):
                term = ((conjugate * state.index_select(1, flip)) @ table).real
                result = term if result is None else result + term
        if result is None:  # every coefficient is zero; stay connected to the graph
            result = (state.real[:, :1] * 0.0).expand(batch, self.num_observables)
        return result

    def inner(self, bra: torch.Tensor, ket: torch.Tensor) -> torch.Tensor:
        """Complex ``<bra|O_k|ket>`` for ``(batch, 2**n)`` states -> ``(batch, n_obs)``."""
        consts = self._cache.get(ket.device, ket.dtype)
        conjugate = bra.conj()
        result = torch.zeros(ket.shape[0], self.num_observables, dtype=ket.dtype, device=ket.device)
        if consts["diagonal"] is not None:
            result = result + (conjugate * ket) @ consts["diagonal"]
        for flip, table in zip(consts["flips"], consts["tables"], strict=True):
            result = result + (conjugate * ket.index_select(1, flip)) @ table
        return result


# --------------------------------------------------------------------------------------------
# nn.Module wrapper.
# --------------------------------------------------------------------------------------------


class TorchQNN(nn.Module):
    """Expectation values of a parameterized circuit as a torch layer with trainable weights.

    ``forward(inputs)`` maps ``(batch, n_inputs)`` (or ``(n_inputs,)``) to
    ``(batch, n_observables)`` (or ``(n_observables,)``) in the executor's real dtype
    (float64 by default), with exact gradients for both the inputs and :attr:`weight`.

    Args:
        circuit: The circuit; its parameters must be exactly ``input_params`` and
            ``weight_params``.
        input_params: Parameters fed from the input columns, in column order.
        weight_params: Parameters held in :attr:`weight`, in order.
        observables: Pauli-sum observables, one output column each.
        initial_weights: Starting weights; defaults to ``U(-1, 1)`` from torch's generator.
        dtype: Executor dtype (see :class:`TorchCircuit`).
    """

    def __init__(
        self,
        circuit: QuantumCircuit,
        input_params: Sequence[Parameter],
        weight_params: Sequence[Parameter],
        observables: Any,
        *,
        initial_weights: Any = None,
        dtype: torch.dtype = torch.complex128,
    ):
        super().__init__()
        self.input_params = tuple(input_params)
        self.weight_params = tuple(weight_params)
        ordered = self.input_params + self.weight_params
        extra = set(ordered) - set(circuit.parameters)
        if extra:
            raise ValueError(f"parameters not in the circuit: {sorted(p.name for p in extra)}")
        self.executor = TorchCircuit(circuit, ordered, dtype=dtype)
        self.observables = PauliObservables(observables, circuit.num_qubits)
        real_dtype = self.executor.real_dtype
        if initial_weights is None:
            weights = torch.rand(len(self.weight_params), dtype=real_dtype) * 2.0 - 1.0
        else:
            weights = torch.as_tensor(np.asarray(initial_weights, dtype=np.float64))
            weights = weights.to(real_dtype).reshape(len(self.weight_params))
        self.weight = nn.Parameter(weights)

    @property
    def num_inputs(self) -> int:
        """Input columns expected by :meth:`forward`."""
        return len(self.input_params)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Expectation values for each row of ``inputs``."""
        single = inputs.dim() == 1
        rows = inputs.reshape(1, -1) if single else inputs
        if rows.shape[-1] != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} input columns, got {rows.shape[-1]}")
        weights = self.weight.to(self.executor.real_dtype)
        values = torch.cat(
            [
                rows.to(device=weights.device, dtype=weights.dtype),
                weights.unsqueeze(0).expand(rows.shape[0], -1),
            ],
            dim=1,
        )
        out = self.executor.expectation_values(values, self.observables)
        return out[0] if single else out
