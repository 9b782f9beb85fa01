"""ONNX export, static int8 quantization and onnxruntime scoring of classifiers.

Every deployable file takes ``images`` ``(n, c, h, w)`` float32 in ``[0, 1]`` and has three
outputs: ``logits`` ``(n, k)``, ``probabilities`` ``(n, k)`` (softmax of the logits) and
``label`` ``(n,)`` int64 (their argmax), so a served model answers with labels and class
probabilities (:func:`add_label_outputs`).

int8 is onnxruntime's *static* QDQ quantization (``quantize_static``: S8S8, per-channel
weights, after its pre-processing), calibrated on training images. Dynamic quantization
turns every Conv into ConvInteger and quantizes activations on every call, which is slower
than fp32 on a CNN; static QDQ lets onnxruntime fuse Conv (+ folded BatchNorm) + ReLU into
one integer op. Ops between two convs that have no integer kernel (GroupNorm) cost a
dequantize/quantize pair each, so a GroupNorm model gains little or loses: every variant is
measured (:func:`interleaved_latency_ms`).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
LABEL_NAME = "label"
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def export_onnx(model, image_shape: tuple[int, int], path: Path, opset: int) -> None:
    """Export a classifier taking ``(n, c, h, w)`` float32 (``c`` from its encoder config) to
    ONNX with a dynamic batch axis; logits only (see :func:`add_label_outputs`). BatchNorm is
    folded into the convs (eval mode)."""
    import torch

    channels = int(model.encoder.config.get("in_channels", 1))
    example = torch.zeros(1, channels, *image_shape, dtype=torch.float32)
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )


def add_label_outputs(path: Path) -> None:
    """Add ``probabilities`` (softmax) and ``label`` (argmax, int64) outputs after the
    ``logits`` of the ONNX model at ``path`` (in place). Done after quantization, so both
    stay float and exact."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    if any(o.name == LABEL_NAME for o in graph.output):
        return
    graph.node.extend(
        [
            helper.make_node("Softmax", [OUTPUT_NAME], [PROBABILITIES_NAME], axis=1),
            helper.make_node("ArgMax", [OUTPUT_NAME], [LABEL_NAME], axis=1, keepdims=0),
        ]
    )
    classes = graph.output[0].type.tensor_type.shape.dim[1]
    graph.output.extend(
        [
            helper.make_tensor_value_info(
                PROBABILITIES_NAME,
                TensorProto.FLOAT,
                ["batch", classes.dim_value or classes.dim_param or None],
            ),
            helper.make_tensor_value_info(LABEL_NAME, TensorProto.INT64, ["batch"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class _ImageBatches:
    """onnxruntime ``CalibrationDataReader`` over images, ``batch_size`` rows per feed."""

    def __init__(self, images: np.ndarray, batch_size: int = 64):
        from pipelines.models.encoder import as_image_batch

        x = as_image_batch(images)
        self._feeds = iter(
            [{INPUT_NAME: x[i : i + batch_size]} for i in range(0, len(x), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantization tools log a line per tensor on the root logger; keep only
    warnings while they run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_static_int8(
    source: Path, target: Path, calibration_images: np.ndarray, method: str = "minmax"
) -> None:
    """Static QDQ int8 (S8S8, per-channel weights) of the fp32 ONNX model ``source`` into
    ``target``, after onnxruntime's pre-processing (shape inference, graph optimization),
    with activation ranges calibrated on ``calibration_images`` by ``method``
    (:data:`CALIBRATION_METHODS`)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}: {method!r}")
    if len(calibration_images) == 0:
        raise ValueError("static int8 needs at least one calibration image")
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    reader = type("Reader", (_ImageBatches, CalibrationDataReader), {})(calibration_images)
    with tempfile.TemporaryDirectory() as scratch, _quiet_root_logger():
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=calibrate,
        )


def onnx_session(path: Path, threads: int = 1):
    """A CPU onnxruntime session on ``threads`` threads (1: stable latency numbers)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits of ``images`` ``(n, c, h, w)`` from an onnxruntime session."""
    from pipelines.models.encoder import as_image_batch

    x = as_image_batch(images)
    parts = [
        session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts)


def onnx_predictor(session) -> Callable[[np.ndarray], list]:
    """A function running every output of ``session`` on one batch (what a served model
    computes), for latency measurements."""
    from pipelines.models.encoder import as_image_batch

    return lambda x: session.run(None, {INPUT_NAME: as_image_batch(x)})


def interleaved_latency_ms(
    predictors: dict[str, Callable[[np.ndarray], object]],
    images: np.ndarray,
    batch_size: int,
    repeats: int,
) -> dict[str, float]:
    """Median wall time in ms of each predictor on one batch of ``batch_size`` images.

    The predictors take turns within every repeat (after one warm-up call each), so a
    change in machine load hits them all alike instead of whichever ran last.
    """
    copies = int(np.ceil(batch_size / len(images)))
    batch = np.concatenate([images] * copies)[:batch_size]
    for predict in predictors.values():
        predict(batch)
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(repeats):
        for name, predict in predictors.items():
            start = time.perf_counter()
            predict(batch)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(values)) for name, values in times.items()}


def cpu_description() -> dict[str, object]:
    """The CPU latency figures were measured on: model name, logical cores, and the SIMD
    flags that decide int8 speed (AVX2, AVX-512, VNNI, AMX)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    import os

    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "flags": [f for f in wanted if f in flags],
    }
