"""Which variant evaluate hands to register: the hybrid head only when it wins on val."""

from __future__ import annotations

import pytest

from pipelines.config import EvaluateParams
from pipelines.stages.evaluate import choose_deployable


def variants(fp32=0.95, int8=0.95, hybrid=0.5, classical=0.6, federated=0.95):
    vals = {
        "federated": federated,
        "onnx_fp32": fp32,
        "onnx_int8": int8,
        "quantum_hybrid": hybrid,
        "quantum_classical": classical,
    }
    return {name: {"val_accuracy": v, "test_accuracy": v} for name, v in vals.items()}


@pytest.mark.parametrize(
    ("kwargs", "chosen"),
    [
        ({}, "onnx_int8"),
        ({"int8": 0.90}, "onnx_fp32"),  # drop 0.05 > max_int8_drop 0.02
        ({"int8": 0.94}, "onnx_int8"),  # drop 0.01 is within bounds
        ({"hybrid": 0.97}, "quantum_hybrid"),  # best on val of every variant
        ({"hybrid": 0.95}, "onnx_int8"),  # a tie is not a win
        ({"hybrid": 0.97, "classical": 0.98}, "onnx_int8"),  # its classical twin is better
        ({"hybrid": 0.97, "federated": 0.99}, "onnx_int8"),
    ],
)
def test_choose_deployable(kwargs, chosen):
    assert choose_deployable(variants(**kwargs), EvaluateParams(max_int8_drop=0.02)) == chosen
