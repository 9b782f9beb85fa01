"""Model compression and edge export: ONNX (fp32) and int8 dynamic quantization.

The federated classifier is exported to ONNX, quantized to int8 with onnxruntime's dynamic
quantization, and both files are re-scored in onnxruntime (the target runtime) against the
torch model: accuracy on val, agreement with torch, size, and latency at batch 1 and at a
large batch (int8 can be slower at batch 1 on tiny models, so both are measured).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipelines.config import OptimizeParams, Params
from pipelines.io import Paths, atomic_outputs, read_image_table, write_json
from pipelines.tracking import StageTracker

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(model, image_shape: tuple[int, int], path: Path, opset: int) -> None:
    """Export a classifier taking ``(n, c, h, w)`` float32 (``c`` from its encoder config) to
    ONNX with a dynamic batch axis."""
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


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of an ONNX model (weights int8, activations at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def onnx_session(path: Path):
    """A single-threaded CPU onnxruntime session (stable latency numbers)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
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


def median_latency_ms(predict, images: np.ndarray, batch_size: int, repeats: int) -> float:
    """Median wall time in ms of ``predict`` on one batch of ``batch_size`` images."""
    reps = int(np.ceil(batch_size / len(images)))
    batch = np.concatenate([images] * reps)[:batch_size]
    predict(batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(batch)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def optimize(
    model,
    image_shape: tuple[int, int],
    val_images: np.ndarray,
    val_labels: np.ndarray,
    p: OptimizeParams,
    out_dir: Path,
) -> dict[str, float]:
    """Export + quantize ``model`` into ``out_dir`` and measure size, accuracy and latency."""
    import torch

    from pipelines.models.probes import predict_logits

    fp32_path, int8_path = out_dir / "model.onnx", out_dir / "model.int8.onnx"
    export_onnx(model, image_shape, fp32_path, p.onnx_opset)
    quantize_int8(fp32_path, int8_path)
    fp32, int8 = onnx_session(fp32_path), onnx_session(int8_path)

    reference = predict_logits(model, val_images)
    results: dict[str, float] = {}
    for name, logits in (
        ("torch", reference),
        ("onnx", onnx_logits(fp32, val_images)),
        ("int8", onnx_logits(int8, val_images)),
    ):
        results[f"{name}_val_accuracy"] = float((logits.argmax(1) == val_labels).mean())
        results[f"{name}_agreement"] = float((logits.argmax(1) == reference.argmax(1)).mean())
    results["onnx_max_abs_logit_diff"] = float(
        np.abs(onnx_logits(fp32, val_images) - reference).max()
    )
    results["int8_accuracy_drop"] = results["onnx_val_accuracy"] - results["int8_val_accuracy"]

    torch_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    results["torch_bytes"] = float(torch_bytes)
    results["onnx_bytes"] = float(fp32_path.stat().st_size)
    results["int8_bytes"] = float(int8_path.stat().st_size)
    results["int8_size_ratio"] = results["onnx_bytes"] / results["int8_bytes"]

    torch.set_num_threads(1)
    predictors = {
        "torch": lambda x: predict_logits(model, x),
        "onnx": lambda x: onnx_logits(fp32, x),
        "int8": lambda x: onnx_logits(int8, x),
    }
    for batch_size in p.latency_batch_sizes:
        for name, predict in predictors.items():
            ms = median_latency_ms(predict, val_images, batch_size, p.latency_repeats)
            results[f"{name}_latency_ms_b{batch_size}"] = ms
    return results


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Export and quantize the federated model; write models/optimize and its report."""
    from pipelines.models.encoder import load_classifier

    model = load_classifier(paths.model_dir("federate"))
    val = read_image_table(paths.partitions / "val.parquet")
    out = paths.model_dir("optimize")
    with atomic_outputs(dirs=[out], files=[paths.report("optimize")]) as staged:
        metrics = optimize(
            model, val.image_shape, val.images, val.labels, params.optimize, staged.path(out)
        )
        write_json(
            staged.path(out) / "manifest.json",
            {
                "input_name": INPUT_NAME,
                "output_name": OUTPUT_NAME,
                "image_shape": list(val.image_shape),
                "channels": val.channels,
                "files": {"onnx": "model.onnx", "int8": "model.int8.onnx"},
                "opset": params.optimize.onnx_opset,
            },
        )
        write_json(staged.path(paths.report("optimize")), metrics)
        log.info(
            "int8 is %.2fx smaller; val accuracy onnx %.4f, int8 %.4f",
            metrics["int8_size_ratio"],
            metrics["onnx_val_accuracy"],
            metrics["int8_val_accuracy"],
        )
    tracker.log_metrics(metrics)
    tracker.log_artifact(out / "model.onnx", "onnx")
    tracker.log_artifact(out / "model.int8.onnx", "onnx")
    return metrics
