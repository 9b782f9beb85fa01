"""The variational circuit of the hybrid head, built apart from any simulator or trainer.

Layout: a ZZ feature map (``zz_feature_map``) loads one angle per qubit, then a
``real_amplitudes`` ansatz of ``reps`` entangling layers holds the trainable weights; the
head reads ``<Z_i>`` on every qubit. With one qubit there are no pairs to entangle, so the
map is the Z feature map (what the ZZ map reduces to).

Nothing here depends on qiskit-machine-learning, so a faster simulator can reuse the same
circuit, parameters and observables.
"""

from __future__ import annotations

from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.circuit.library import real_amplitudes, z_feature_map, zz_feature_map
from qiskit.quantum_info import SparsePauliOp

FEATURE_MAP_REPS = 2
# Gates the circuit is reported in (what the feature map and ansatz are made of).
PRIMITIVE_GATES = frozenset({"h", "p", "cx", "rx", "ry", "rz", "x", "y", "z", "cz", "rzz"})


def build_circuit(
    n_qubits: int,
    reps: int,
    entanglement: str = "linear",
    feature_reps: int = FEATURE_MAP_REPS,
) -> tuple[QuantumCircuit, list[Parameter], list[Parameter]]:
    """Feature map + ansatz on ``n_qubits``: ``(circuit, input_params, weight_params)``.

    ``input_params`` (one angle per qubit) and ``weight_params`` (``n_qubits * (reps + 1)``
    ``RY`` angles) are in the order the qiskit library functions define them.
    """
    if n_qubits < 1:
        raise ValueError(f"n_qubits must be at least 1, got {n_qubits}")
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    if n_qubits == 1:
        feature_map = z_feature_map(1, reps=feature_reps)
    else:
        feature_map = zz_feature_map(n_qubits, reps=feature_reps, entanglement=entanglement)
    ansatz = real_amplitudes(n_qubits, reps=reps, entanglement=entanglement)
    circuit = QuantumCircuit(n_qubits, name="hybrid_head")
    circuit.compose(feature_map, inplace=True)
    circuit.compose(ansatz, inplace=True)
    return circuit, list(feature_map.parameters), list(ansatz.parameters)


def z_observables(n_qubits: int) -> list[SparsePauliOp]:
    """``Z`` on each qubit ``i`` (identity elsewhere), in qubit order."""
    return [
        SparsePauliOp.from_sparse_list([("Z", [i], 1.0)], num_qubits=n_qubits)
        for i in range(n_qubits)
    ]


def decompose_to_primitives(circuit: QuantumCircuit, max_rounds: int = 10) -> QuantumCircuit:
    """Decompose composite instructions until only :data:`PRIMITIVE_GATES` remain."""
    for _ in range(max_rounds):
        composite = {
            inst.operation.name
            for inst in circuit.data
            if inst.operation.name not in PRIMITIVE_GATES
        }
        if not composite:
            break
        circuit = circuit.decompose(gates_to_decompose=sorted(composite))
    return circuit


def circuit_stats(
    circuit: QuantumCircuit, weight_params: list[Parameter] | None = None
) -> dict[str, int]:
    """Qubits, depth and gate count after decomposition to primitive gates, and weight count.

    ``n_weights`` is ``len(weight_params)`` when given, else every parameter whose name does
    not start with ``x`` (the feature map's prefix).
    """
    flat = decompose_to_primitives(circuit)
    if weight_params is None:
        weights = [p for p in circuit.parameters if not p.name.startswith("x")]
    else:
        weights = list(weight_params)
    return {
        "n_qubits": int(circuit.num_qubits),
        "depth": int(flat.depth()),
        "gates": int(sum(flat.count_ops().values())),
        "two_qubit_gates": int(flat.num_nonlocal_gates()),
        "n_weights": len(weights),
        "n_inputs": int(circuit.num_parameters - len(weights)),
    }
