"""Torch statevector executor and the primitives built on it, checked against qiskit.

Random circuits over the whole supported gate set (angles that are numbers, parameters or
non-linear expressions of parameters) against ``Statevector``; gradients against
``ParamShiftEstimatorGradient``; the Estimator V2 primitive against ``StatevectorEstimator``
on the same PUB shapes; ``EstimatorQNN`` + ``TorchConnector`` against the reference
primitives; error messages for what cannot be simulated; and ``gradcheck`` on the module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qiskit import QuantumCircuit
from qiskit.circuit import Gate, Parameter, ParameterVector
from qiskit.circuit.library import (
    UnitaryGate,
    get_standard_gate_name_mapping,
    real_amplitudes,
)
from qiskit.primitives import StatevectorEstimator
from qiskit.quantum_info import SparsePauliOp, Statevector, random_unitary
from qiskit_machine_learning.connectors import TorchConnector
from qiskit_machine_learning.gradients import (
    DerivativeType,
    LinCombEstimatorGradient,
    ParamShiftEstimatorGradient,
)
from qiskit_machine_learning.neural_networks import EstimatorQNN

from pipelines.quantum.circuits import build_circuit, z_observables
from pipelines.quantum.primitive import TorchEstimator, TorchEstimatorGradient
from pipelines.quantum.statevector import (
    SUPPORTED_GATES,
    PauliObservables,
    TorchCircuit,
    TorchQNN,
    UnsupportedInstructionError,
    decompose_to_supported,
)

# name -> (number of qubits, number of angles)
GATE_SET: dict[str, tuple[int, int]] = {
    "id": (1, 0),
    "h": (1, 0),
    "x": (1, 0),
    "y": (1, 0),
    "z": (1, 0),
    "s": (1, 0),
    "sdg": (1, 0),
    "t": (1, 0),
    "tdg": (1, 0),
    "sx": (1, 0),
    "sxdg": (1, 0),
    "rx": (1, 1),
    "ry": (1, 1),
    "rz": (1, 1),
    "p": (1, 1),
    "u1": (1, 1),
    "u2": (1, 2),
    "u": (1, 3),
    "u3": (1, 3),
    "cx": (2, 0),
    "cy": (2, 0),
    "cz": (2, 0),
    "swap": (2, 0),
    "crx": (2, 1),
    "cry": (2, 1),
    "crz": (2, 1),
    "cp": (2, 1),
    "cu1": (2, 1),
    "rzz": (2, 1),
    "rxx": (2, 1),
    "ryy": (2, 1),
}
GATE_CLASSES = {name: type(get_standard_gate_name_mapping()[name]) for name in GATE_SET}
NUM_FREE_PARAMETERS = 4
ANGLES = st.floats(-2 * math.pi, 2 * math.pi, allow_nan=False, allow_infinity=False)


def test_gate_set_covers_every_supported_gate():
    assert set(GATE_SET) == set(SUPPORTED_GATES)


def _angle(kind: int, a: int, b: int, scale: float, theta: ParameterVector):
    """A gate angle: a number, a parameter, an affine or a non-linear expression."""
    if kind == 0:
        return scale
    if kind == 1:
        return theta[a]
    if kind == 2:
        return scale * theta[a] + 0.5
    if kind == 3:
        return theta[a] * theta[b]
    if kind == 4:
        return (math.pi - theta[a]) * (math.pi - theta[b])
    return scale * theta[a].sin() + theta[b] ** 2


@st.composite
def random_circuits(draw, max_qubits: int = 6, max_gates: int = 24):
    """``(circuit, parameters, values)`` over the whole gate set, two rows of values."""
    n = draw(st.integers(1, max_qubits))
    theta = ParameterVector("θ", NUM_FREE_PARAMETERS)
    circuit = QuantumCircuit(n)
    names = [name for name, (width, _) in GATE_SET.items() if width <= n]
    for _ in range(draw(st.integers(0, max_gates))):
        name = draw(st.sampled_from(names))
        width, num_angles = GATE_SET[name]
        qubits = draw(st.permutations(range(n)))[:width]
        angles = [
            _angle(
                draw(st.integers(0, 5)),
                draw(st.integers(0, NUM_FREE_PARAMETERS - 1)),
                draw(st.integers(0, NUM_FREE_PARAMETERS - 1)),
                draw(ANGLES),
                theta,
            )
            for _ in range(num_angles)
        ]
        circuit.append(GATE_CLASSES[name](*angles), qubits)
        if draw(st.integers(0, 9)) == 0:
            circuit.barrier()
    parameters = draw(st.permutations(list(circuit.parameters)))  # any column order works
    size = 2 * len(parameters)
    values = draw(st.lists(ANGLES, min_size=size, max_size=size))
    return circuit, parameters, np.asarray(values).reshape(2, len(parameters))


NONZERO = st.floats(0.1, 2.0) | st.floats(-2.0, -0.1)


@st.composite
def random_observables(draw, num_qubits: int, max_observables: int = 3, real: bool = False):
    """Random Pauli sums with complex (or, with ``real``, real non-zero) coefficients."""
    observables = []
    for _ in range(draw(st.integers(1, max_observables))):
        num_terms = draw(st.integers(1, 4))
        labels = [
            "".join(
                draw(st.lists(st.sampled_from("IXYZ"), min_size=num_qubits, max_size=num_qubits))
            )
            for _ in range(num_terms)
        ]
        coefficients = [
            draw(NONZERO) if real else complex(draw(st.floats(-2, 2)), draw(st.floats(-2, 2)))
            for _ in range(num_terms)
        ]
        observables.append(SparsePauliOp(labels, coefficients))
    return observables


def _bound(circuit: QuantumCircuit, parameters, values) -> QuantumCircuit:
    return circuit.assign_parameters(dict(zip(parameters, values, strict=True)))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_circuits_match_statevector(data):
    circuit, parameters, values = data.draw(random_circuits())
    observables = data.draw(random_observables(circuit.num_qubits))
    executor = TorchCircuit(circuit, parameters)
    states = executor.state(values).numpy()
    evs = executor.expectation_values(values, observables).numpy()
    assert states.shape == (2, 2**circuit.num_qubits)
    assert evs.shape == (2, len(observables))
    for row, state, row_evs in zip(values, states, evs, strict=True):
        reference = Statevector(_bound(circuit, parameters, row))
        np.testing.assert_allclose(state, reference.data, atol=1e-10, rtol=0)
        expected = [reference.expectation_value(op).real for op in observables]
        np.testing.assert_allclose(row_evs, expected, atol=1e-10, rtol=0)


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_single_precision_matches_statevector(data):
    circuit, parameters, values = data.draw(random_circuits(max_qubits=4, max_gates=12))
    executor = TorchCircuit(circuit, parameters, dtype=torch.complex64)
    state = executor.state(values[0])
    assert state.dtype == torch.complex64
    reference = Statevector(_bound(circuit, parameters, values[0])).data
    np.testing.assert_allclose(state.numpy(), reference, atol=2e-5, rtol=0)


def test_batched_states_follow_parameter_rows():
    circuit, inputs, weights = build_circuit(3, 2)
    executor = TorchCircuit(circuit)
    values = np.random.default_rng(0).uniform(-3, 3, (5, circuit.num_parameters))
    states = executor.state(torch.tensor(values)).numpy()
    assert states.shape == (5, 8)
    for row, state in zip(values, states, strict=True):
        expected = Statevector(_bound(circuit, circuit.parameters, row)).data
        np.testing.assert_allclose(state, expected, atol=1e-12, rtol=0)


def test_composite_and_matrix_gates_are_expanded():
    a = Parameter("a")
    block = QuantumCircuit(2, name="block")
    block.ry(2 * a, 0)
    block.ch(0, 1)
    circuit = QuantumCircuit(3)
    circuit.reset(0)  # nothing has acted on qubit 0 yet: a no-op
    circuit.append(block.to_gate(), [2, 0])
    circuit.ccx(0, 2, 1)
    circuit.ecr(1, 2)
    circuit.append(UnitaryGate(random_unitary(4, seed=3)), [0, 2])
    circuit.compose(real_amplitudes(3, reps=1).to_gate(), inplace=True)
    circuit.rzx(a, 0, 1)
    parameters = list(circuit.parameters)
    values = np.linspace(0.2, 1.4, len(parameters))
    expected = Statevector(_bound(circuit, parameters, values)).data
    state = TorchCircuit(circuit, parameters).state(values).numpy()
    np.testing.assert_allclose(state, expected, atol=1e-10, rtol=0)

    flat = decompose_to_supported(circuit)
    assert {inst.operation.name for inst in flat.data} <= SUPPORTED_GATES
    flat_expected = Statevector(_bound(flat, parameters, values)).data
    np.testing.assert_allclose(flat_expected, expected, atol=1e-10, rtol=0)


# -- gradients ---------------------------------------------------------------------------------

ROTATION_GATES = {"rx": 1, "ry": 1, "rz": 1, "p": 1, "rxx": 2, "ryy": 2, "rzz": 2}
FIXED_GATES = {"h": 1, "cx": 2, "cz": 2}


@st.composite
def rotation_circuits(draw):
    """Small circuits of rotation gates with plain (possibly repeated) parameters."""
    n = draw(st.integers(1, 3))
    theta = ParameterVector("w", 3)
    circuit = QuantumCircuit(n)
    circuit.h(range(n))
    gate_widths = {**ROTATION_GATES, **FIXED_GATES}
    names = [name for name, width in gate_widths.items() if width <= n]
    for _ in range(draw(st.integers(1, 7))):
        name = draw(st.sampled_from(names))
        qubits = draw(st.permutations(range(n)))[: gate_widths[name]]
        if name in ROTATION_GATES:
            getattr(circuit, name)(theta[draw(st.integers(0, 2))], *qubits)
        else:
            getattr(circuit, name)(*qubits)
    if not circuit.parameters:
        circuit.ry(theta[0], 0)
    values = draw(
        st.lists(ANGLES, min_size=circuit.num_parameters, max_size=circuit.num_parameters)
    )
    return circuit, np.asarray(values)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_gradients_match_parameter_shift(data):
    circuit, values = data.draw(rotation_circuits())
    observable = data.draw(random_observables(circuit.num_qubits, max_observables=1, real=True))[0]
    if not np.any(observable.simplify().coeffs):  # the reference rejects zero observables
        observable = observable + SparsePauliOp("Z" * circuit.num_qubits)
    ours = TorchEstimatorGradient(TorchEstimator()).run([circuit], [observable], [values])
    shift = ParamShiftEstimatorGradient(StatevectorEstimator()).run(
        [circuit], [observable], [values]
    )
    np.testing.assert_allclose(
        ours.result().gradients[0], shift.result().gradients[0], atol=1e-8, rtol=0
    )


def test_gradients_match_parameter_shift_on_the_hybrid_circuit():
    circuit, _, _ = build_circuit(3, 2)
    rng = np.random.default_rng(1)
    values = rng.uniform(0, math.pi, (2, circuit.num_parameters))
    observables = [z_observables(3)[0], SparsePauliOp(["XZY", "ZZI"], [0.4, -1.1])]
    subset = [circuit.parameters[3:], None]
    ours = TorchEstimatorGradient(TorchEstimator()).run(
        [circuit] * 2, observables, values, parameters=subset
    )
    shift = ParamShiftEstimatorGradient(StatevectorEstimator()).run(
        [circuit] * 2, observables, values, parameters=subset
    )
    ours, shift = ours.result(), shift.result()
    for mine, theirs in zip(ours.gradients, shift.gradients, strict=True):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, atol=1e-8, rtol=0)
    assert [list(m["parameters"]) for m in ours.metadata] == [
        list(m["parameters"]) for m in shift.metadata
    ]


@pytest.mark.parametrize("derivative_type", [DerivativeType.IMAG, DerivativeType.COMPLEX])
def test_imaginary_and_complex_gradients_match_lin_comb(derivative_type):
    w = ParameterVector("w", 3)
    circuit = QuantumCircuit(2)
    circuit.h(0)
    circuit.rx(w[0], 0)
    circuit.ry(w[1], 1)
    circuit.cx(0, 1)
    circuit.rzz(w[2], 0, 1)
    circuit.rx(w[0], 1)
    observable = SparsePauliOp(["XY", "ZI", "YY"], [0.5, -0.3, 0.8])
    values = [[0.3, -0.7, 1.1]]
    ours = TorchEstimatorGradient(TorchEstimator(), derivative_type=derivative_type)
    lin_comb = LinCombEstimatorGradient(StatevectorEstimator(), derivative_type=derivative_type)
    mine = ours.run([circuit], [observable], values).result().gradients[0]
    theirs = lin_comb.run([circuit], [observable], values).result().gradients[0]
    np.testing.assert_allclose(mine, theirs, atol=1e-10, rtol=0)


# -- primitive -----------------------------------------------------------------------------------


def _primitive_cases():
    a, b = Parameter("a"), Parameter("b")
    circuit = QuantumCircuit(2)
    circuit.h(0)
    circuit.ry(a, 1)
    circuit.cx(0, 1)
    circuit.rz(a * b, 0)
    circuit.rx(b, 1)
    fixed = QuantumCircuit(2)
    fixed.h(0)
    fixed.cx(0, 1)
    rng = np.random.default_rng(7)
    zz = SparsePauliOp("ZZ")
    mixed = SparsePauliOp(["XY", "IZ"], [0.5, -1.5])
    return {
        "scalar": (circuit, zz, rng.uniform(-2, 2, 2)),
        "vector": (circuit, mixed, rng.uniform(-2, 2, (3, 2))),
        "matrix": (circuit, mixed, rng.uniform(-2, 2, (2, 3, 2))),
        "broadcast": (circuit, [[zz], [mixed]], rng.uniform(-2, 2, (3, 2))),
        "observable_list": (circuit, ["XX", "YY", "ZI"], rng.uniform(-2, 2, 2)),
        "no_parameters": (fixed, ["XX", "ZI", "YY"]),
        "no_parameters_scalar": (fixed, zz),
    }


@pytest.mark.parametrize("case", list(_primitive_cases()))
def test_estimator_matches_statevector_estimator(case):
    pub = _primitive_cases()[case]
    ours = TorchEstimator().run([pub]).result()
    reference = StatevectorEstimator().run([pub]).result()
    assert ours.metadata == reference.metadata
    (mine,), (theirs,) = list(ours), list(reference)
    assert mine.data.evs.shape == theirs.data.evs.shape == mine.data.shape
    np.testing.assert_allclose(mine.data.evs, theirs.data.evs, atol=1e-12, rtol=0)
    np.testing.assert_array_equal(mine.data.stds, np.zeros_like(theirs.data.evs))
    assert mine.metadata == theirs.metadata


def test_estimator_runs_several_pubs_and_reuses_compiled_circuits():
    cases = _primitive_cases()
    pubs = [cases["vector"], cases["broadcast"], cases["no_parameters"]]
    estimator = TorchEstimator()
    first = estimator.run(pubs, precision=0.01).result()
    second = estimator.run(pubs, precision=0.01).result()
    reference = StatevectorEstimator().run(pubs).result()
    assert len(estimator._circuits) == 2
    for mine, again, theirs in zip(first, second, reference, strict=True):
        np.testing.assert_allclose(mine.data.evs, theirs.data.evs, atol=1e-12, rtol=0)
        np.testing.assert_array_equal(mine.data.evs, again.data.evs)
        assert mine.metadata["target_precision"] == 0.01


# -- EstimatorQNN + TorchConnector -----------------------------------------------------------------


def _connector(estimator, gradient, circuit, inputs, weights, initial_weights):
    qnn = EstimatorQNN(
        circuit=circuit,
        observables=z_observables(circuit.num_qubits),
        input_params=inputs,
        weight_params=weights,
        estimator=estimator,
        gradient=gradient,
        input_gradients=True,
        default_precision=0.0,
    )
    return TorchConnector(qnn, initial_weights=initial_weights)


def _forward_backward(model, inputs):
    inputs = inputs.clone().requires_grad_(True)
    model.zero_grad()
    out = model(inputs)
    (out * torch.arange(1, out.shape[1] + 1, dtype=out.dtype)).sum().backward()
    return out.detach().double(), inputs.grad.double(), model.weight.grad.detach().double()


def test_estimator_qnn_with_torch_primitives_matches_reference():
    circuit, inputs, weights = build_circuit(2, 1)
    rng = np.random.default_rng(3)
    # float32-representable, since TorchConnector stores its weights in float32
    initial = rng.uniform(-1, 1, len(weights)).astype(np.float32).astype(np.float64)
    batch = torch.tensor(rng.uniform(0, math.pi, (3, 2)).astype(np.float32).astype(np.float64))
    ours = _connector(
        TorchEstimator(),
        TorchEstimatorGradient(TorchEstimator()),
        circuit,
        inputs,
        weights,
        initial,
    )
    reference = _connector(
        StatevectorEstimator(),
        ParamShiftEstimatorGradient(StatevectorEstimator()),
        circuit,
        inputs,
        weights,
        initial,
    )
    module = TorchQNN(circuit, inputs, weights, z_observables(2), initial_weights=initial)
    expected = _forward_backward(reference, batch)
    for model in (ours, module):
        for got, want in zip(_forward_backward(model, batch), expected, strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, rtol=0)


# -- errors ----------------------------------------------------------------------------------------


def test_opaque_gate_is_rejected_by_name_and_index():
    circuit = QuantumCircuit(2)
    circuit.h(0)
    circuit.append(Gate("mygate", 1, []), [1])
    with pytest.raises(UnsupportedInstructionError, match=r"'mygate' at index 1") as error:
        TorchCircuit(circuit)
    assert error.value.instruction == "mygate" and error.value.index == 1
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("final", [False, True])
def test_measurements_are_rejected_by_name_and_index(final):
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.measure(0, 0)
    if not final:
        circuit.cx(0, 1)
    with pytest.raises(ValueError, match=r"'measure' at index 1"):
        TorchCircuit(circuit)


def test_reset_after_a_gate_and_control_flow_are_rejected():
    circuit = QuantumCircuit(1)
    circuit.x(0)
    circuit.reset(0)
    with pytest.raises(UnsupportedInstructionError, match=r"'reset' at index 1"):
        TorchCircuit(circuit)
    conditional = QuantumCircuit(1, 1)
    conditional.h(0)
    with conditional.if_test((conditional.clbits[0], 1)):
        conditional.x(0)
    with pytest.raises(UnsupportedInstructionError, match=r"'if_else' at index 1"):
        TorchCircuit(conditional)


def test_parameter_values_and_observables_are_validated():
    circuit, _, _ = build_circuit(2, 1)
    executor = TorchCircuit(circuit)
    with pytest.raises(ValueError, match="shape"):
        executor.state(np.zeros((2, circuit.num_parameters + 1)))
    with pytest.raises(ValueError, match="qubits"):
        PauliObservables([SparsePauliOp("ZZZ")], 2)
    with pytest.raises(ValueError, match="missing"):
        TorchCircuit(circuit, list(circuit.parameters)[1:])


# -- nn.Module -------------------------------------------------------------------------------------


def test_module_gradients_pass_gradcheck():
    x, w = ParameterVector("x", 2), ParameterVector("w", 3)
    circuit = QuantumCircuit(2)
    circuit.h([0, 1])
    circuit.rz(x[0] * x[1], 0)
    circuit.ry(w[0], 0)
    circuit.rx(w[1] + x[1], 1)
    circuit.cry(w[2], 0, 1)
    circuit.rzz(2 * x[0], 0, 1)
    observables = [SparsePauliOp(["ZI", "XY"], [1.0, 0.5]), SparsePauliOp("YZ")]
    module = TorchQNN(circuit, list(x), list(w), observables)
    inputs = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    weight = module.weight.detach().clone().requires_grad_(True)

    def run(inputs_, weight_):
        return torch.func.functional_call(module, {"weight": weight_}, (inputs_,))

    assert torch.autograd.gradcheck(run, (inputs, weight), eps=1e-6, atol=1e-8)
    assert module(inputs).shape == (3, 2)
    assert module(inputs[0]).shape == (2,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    circuit, inputs, weights = build_circuit(4, 2)
    module = TorchQNN(circuit, inputs, weights, z_observables(4))
    batch = torch.rand(8, 4, dtype=torch.float64) * math.pi
    expected = module(batch)
    on_gpu = module.to("cuda")(batch.to("cuda"))
    assert on_gpu.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.cpu().detach().numpy(), expected.detach().numpy(), atol=1e-12)
