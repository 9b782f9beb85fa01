"""Which variant evaluate hands to register: the smallest, then fastest ONNX variant within
the accuracy tolerance of fp32; the hybrid head only when it wins on val."""

from __future__ import annotations

import pytest

from pipelines.config import EvaluateParams
from pipelines.stages.evaluate import choose_deployable

# bytes and latency at batch 256 of each ONNX variant
COMPRESSION = {
    "onnx_fp32": (400_000, 8.0),
    "onnx_int8": (140_000, 17.0),
    "pruned_fp32": (120_000, 3.0),
    "distilled_fp32": (115_000, 1.6),
    "distilled_int8": (40_000, 1.4),
}


def compression(**changes):
    table = {**COMPRESSION, **changes}
    return {
        name: {"bytes": size, "latency_ms_b1": latency / 50, "latency_ms_b256": latency}
        for name, (size, latency) in table.items()
    }


def variants(hybrid=0.5, classical=0.6, federated=0.95, **onnx):
    vals = {"federated": federated, "quantum_hybrid": hybrid, "quantum_classical": classical}
    vals.update({name: onnx.get(name, 0.95) for name in COMPRESSION})
    return {name: {"val_accuracy": v, "test_accuracy": v} for name, v in vals.items()}


@pytest.mark.parametrize(
    ("kwargs", "chosen"),
    [
        ({}, "distilled_int8"),  # the smallest, all within the tolerance
        ({"distilled_int8": 0.94}, "distilled_fp32"),  # a drop of 0.01 > 0.005 is refused
        ({"distilled_int8": 0.947}, "distilled_int8"),  # a drop of 0.003 is within it
        ({"distilled_int8": 0.9, "distilled_fp32": 0.9, "pruned_fp32": 0.9}, "onnx_int8"),
        ({"distilled_int8": 0.96}, "distilled_int8"),  # better than fp32 is fine
        ({"hybrid": 0.97}, "quantum_hybrid"),  # best on val of every variant
        ({"hybrid": 0.95}, "distilled_int8"),  # a tie is not a win
        ({"hybrid": 0.97, "classical": 0.98}, "distilled_int8"),  # its classical twin is better
        ({"hybrid": 0.97, "federated": 0.99}, "distilled_int8"),
    ],
)
def test_choose_deployable(kwargs, chosen):
    p = EvaluateParams(max_accuracy_drop=0.005)
    assert choose_deployable(variants(**kwargs), compression(), p) == chosen


def test_every_compressed_variant_too_inaccurate_leaves_fp32():
    worse = {name: 0.5 for name in COMPRESSION if name != "onnx_fp32"}
    p = EvaluateParams(max_accuracy_drop=0.005)
    assert choose_deployable(variants(**worse), compression(), p) == "onnx_fp32"


def test_equal_sizes_go_to_the_faster():
    table = compression(distilled_fp32=(40_000, 1.0))
    p = EvaluateParams(max_accuracy_drop=0.005)
    assert choose_deployable(variants(), table, p) == "distilled_fp32"


def test_record_private_models_never_choose_the_hybrid_head():
    p = EvaluateParams()
    assert choose_deployable(variants(hybrid=0.99), compression(), p, True) == "distilled_int8"
