"""Model compression and edge export: static int8, structured pruning, distillation.

From the federated classifier (the *teacher*) the stage builds up to six ONNX variants:

- ``onnx_fp32``: the teacher exported as it is; ``onnx_int8``: its static QDQ int8;
- ``pruned_fp32`` / ``pruned_int8``: the teacher with ``optimize.prune_ratio`` of every
  conv's channels removed (Torch-Pruning DepGraph, a smaller dense model), fine-tuned by
  distillation from the teacher;
- ``distilled_fp32`` / ``distilled_int8``: a student ``optimize.student_width`` as wide,
  with BatchNorm (folded into the convs at export), trained from scratch on the teacher's
  soft predictions.

int8 is onnxruntime's static QDQ quantization (S8S8, per-channel weights) calibrated on
``optimize.calibration_rows`` training images (:mod:`pipelines.models.onnx_export`).

**What the server distils on.** Pruning's fine-tune and distillation read only the images of
``data/partitions/unlabeled.parquet``, never a label: the rows the pretrain stage already
uses at the server. In remote mode these are the server's own rows, with a public split
only that split; in simulation, the training pool. Under record-level DP
(``federate.dp.unit: record``) with no public split those would be client rows, so the
pruned and distilled variants are not built (the guarantee covers only models that saw
client rows through DP-SGD).

Every variant is scored the same way in onnxruntime on the val rows: file size, parameter
count, accuracy, agreement with ``onnx_fp32``, and latency at each of
``optimize.latency_batch_sizes``, measured interleaved in one process on
``optimize.latency_threads`` threads (the CPU's model and SIMD flags are recorded beside).
``evaluate`` scores them on the test rows and picks the champion.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipelines.config import OptimizeParams, Params
from pipelines.io import (
    Paths,
    atomic_outputs,
    read_image_table,
    read_json,
    save_weights,
    write_json,
)
from pipelines.models.onnx_export import (
    INPUT_NAME,
    LABEL_NAME,
    OUTPUT_NAME,
    PROBABILITIES_NAME,
    add_label_outputs,
    cpu_description,
    export_onnx,
    interleaved_latency_ms,
    onnx_logits,
    onnx_predictor,
    onnx_session,
    quantize_static_int8,
)
from pipelines.tracking import StageTracker

log = logging.getLogger(__name__)

REFERENCE = "onnx_fp32"
# variant → ONNX file in models/optimize (the manifest lists those a run built)
VARIANT_FILES = {
    "onnx_fp32": "model.onnx",
    "onnx_int8": "model.int8.onnx",
    "pruned_fp32": "pruned.onnx",
    "pruned_int8": "pruned.int8.onnx",
    "distilled_fp32": "distilled.onnx",
    "distilled_int8": "distilled.int8.onnx",
}


def distill_settings(p: OptimizeParams):
    """The :class:`~pipelines.models.compression.DistillSettings` of ``optimize`` params."""
    from pipelines.models.compression import DistillSettings

    return DistillSettings(
        epochs=p.distill_epochs,
        batch_size=p.distill_batch_size,
        learning_rate=p.distill_learning_rate,
        temperature=p.distill_temperature,
        soft_weight=p.distill_soft_weight,
    )


def calibration_rows(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` images drawn without replacement (seeded), all of them if fewer."""
    order = np.random.default_rng(seed).permutation(len(images))
    return images[np.sort(order[: min(count, len(images))])]


def smaller_models(
    teacher, train_images: np.ndarray, image_shape: tuple[int, int], p: OptimizeParams, seed: int
) -> dict:
    """name → torch classifier: the pruned and the distilled model (each only when its
    param is on), both trained on the teacher's predictions over ``train_images``."""
    from pipelines.models.compression import (
        distill,
        has_cnn_encoder,
        prune_classifier,
        student_classifier,
    )

    settings = distill_settings(p)

    def progress(name):
        def report(epoch: int, loss: float) -> None:
            if epoch == 1 or epoch % 10 == 0 or epoch == settings.epochs:
                log.info(
                    "%s: epoch %d/%d, distillation loss %.4f", name, epoch, settings.epochs, loss
                )

        return report

    models = {}
    if p.prune_ratio > 0 and not has_cnn_encoder(teacher):
        log.info("no pruned variant: the ScatterNet encoder's filters are fixed, not learnt")
    elif p.prune_ratio > 0:
        pruned = prune_classifier(teacher, p.prune_ratio, image_shape)
        distill(pruned, teacher, train_images, settings, seed, on_epoch_end=progress("pruned"))
        models["pruned"] = pruned
    if p.student_width > 0:
        student = student_classifier(teacher, p.student_width, seed, image_shape)
        distill(student, teacher, train_images, settings, seed, on_epoch_end=progress("distilled"))
        models["distilled"] = student
    return models


def export_variants(
    models: dict,
    image_shape: tuple[int, int],
    calibration: np.ndarray,
    p: OptimizeParams,
    out: Path,
) -> dict[str, Path]:
    """Write every model's fp32 ONNX and its static int8 into ``out``; variant → file."""
    files = {}
    for prefix, model in models.items():
        fp32 = out / VARIANT_FILES[f"{prefix}_fp32"]
        int8 = out / VARIANT_FILES[f"{prefix}_int8"]
        export_onnx(model, image_shape, fp32, p.onnx_opset)
        quantize_static_int8(fp32, int8, calibration, p.calibration_method)
        for path in (fp32, int8):
            add_label_outputs(path)
        files[f"{prefix}_fp32"], files[f"{prefix}_int8"] = fp32, int8
    return files


def measure_variants(
    files: dict[str, Path],
    parameters: dict[str, int],
    val_images: np.ndarray,
    val_labels: np.ndarray,
    p: OptimizeParams,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Size, parameters, val accuracy, agreement with ``onnx_fp32`` and interleaved latency
    of every variant, with the ratios against ``onnx_fp32`` (size: how many times smaller;
    speed-up: how many times faster); and every variant's val logits."""
    sessions = {name: onnx_session(path, p.latency_threads) for name, path in files.items()}
    logits = {name: onnx_logits(session, val_images) for name, session in sessions.items()}
    reference = logits[REFERENCE].argmax(1)
    results = {}
    for name, path in files.items():
        predicted = logits[name].argmax(1)
        results[name] = {
            "bytes": float(path.stat().st_size),
            "parameters": float(parameters[name.rsplit("_", 1)[0]]),
            "val_accuracy": float((predicted == val_labels).mean()),
            "agreement": float((predicted == reference).mean()),
        }
    predictors = {name: onnx_predictor(session) for name, session in sessions.items()}
    for batch_size in p.latency_batch_sizes:
        for name, ms in interleaved_latency_ms(
            predictors, val_images, batch_size, p.latency_repeats
        ).items():
            results[name][f"latency_ms_b{batch_size}"] = ms
    base = results[REFERENCE]
    for metrics in results.values():
        metrics["size_ratio"] = base["bytes"] / metrics["bytes"]
        for batch_size in p.latency_batch_sizes:
            key = f"latency_ms_b{batch_size}"
            metrics[f"speedup_b{batch_size}"] = base[key] / metrics[key]
    return results, logits


def may_distill(paths: Paths) -> tuple[bool, str]:
    """Whether the pool may train smaller models, and where its rows come from (see the
    module docstring: not client rows under record-level DP)."""
    source = read_json(paths.partitions / "manifest.json").get("unlabeled_source", "client rows")
    record_dp = read_json(paths.report("federate")).get("dp_unit") == "record"
    return not (record_dp and source == "client rows"), source


def optimize(
    teacher,
    image_shape: tuple[int, int],
    train_images: np.ndarray | None,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    p: OptimizeParams,
    out_dir: Path,
    seed: int,
) -> dict:
    """Build, export, quantize and measure every variant into ``out_dir``.

    ``train_images``: what calibration and distillation read (None: calibrate on the val
    images and build no pruned or distilled model). Returns the report: per-variant
    metrics, the CPU, and the torch model's agreement with its fp32 export."""
    from pipelines.models.compression import parameter_count
    from pipelines.models.probes import predict_logits

    calibration_source = train_images if train_images is not None else val_images
    calibration = calibration_rows(calibration_source, p.calibration_rows, seed)
    models = {"onnx": teacher}
    if train_images is not None:
        models.update(smaller_models(teacher, train_images, image_shape, p, seed))
    files = export_variants(models, image_shape, calibration, p, out_dir)
    for name, model in models.items():
        if name != "onnx":  # the teacher's weights are federate's output already
            save_weights(model, out_dir, model.config, name)
    parameters = {name: parameter_count(model) for name, model in models.items()}
    variants, logits = measure_variants(files, parameters, val_images, val_labels, p)
    torch_logits = predict_logits(teacher, val_images)
    fp32_logits = logits[REFERENCE]
    return {
        "variants": variants,
        "onnx_max_abs_logit_diff": float(np.abs(fp32_logits - torch_logits).max()),
        "calibration_rows": int(len(calibration)),
        "calibration_method": p.calibration_method,
        "latency_threads": p.latency_threads,
        "cpu": cpu_description(),
    }


def flat_metrics(report: dict) -> dict[str, float]:
    """``variant.key`` → value for MLflow, plus the headline ``smallest_size_ratio``."""
    flat = {
        f"{name}.{key}": value
        for name, metrics in report["variants"].items()
        for key, value in metrics.items()
    }
    flat["smallest_size_ratio"] = max(m["size_ratio"] for m in report["variants"].values())
    flat["onnx_max_abs_logit_diff"] = report["onnx_max_abs_logit_diff"]
    return flat


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Build and measure every compressed variant; write models/optimize and its report."""
    from pipelines.models.encoder import load_classifier

    p = params.optimize
    teacher = load_classifier(paths.model_dir("federate"))
    val = read_image_table(paths.partitions / "val.parquet")
    allowed, source = may_distill(paths)
    train_images = read_image_table(paths.partitions / "unlabeled.parquet").images
    if not allowed:
        log.warning(
            "record-level DP and the unlabeled pool holds client rows: no pruned or distilled "
            "model (they would train on those rows without noise); int8 calibrates on val"
        )
        train_images = None
    out = paths.model_dir("optimize")
    with atomic_outputs(dirs=[out], files=[paths.report("optimize")]) as staged:
        report = optimize(
            teacher,
            val.image_shape,
            train_images,
            val.images,
            val.labels,
            p,
            staged.path(out),
            params.common.seed,
        )
        report["smallest_size_ratio"] = max(m["size_ratio"] for m in report["variants"].values())
        report["distillation_rows"] = 0 if train_images is None else int(len(train_images))
        report["distillation_source"] = source if train_images is not None else None
        write_json(
            staged.path(out) / "manifest.json",
            {
                "input_name": INPUT_NAME,
                "outputs": [OUTPUT_NAME, PROBABILITIES_NAME, LABEL_NAME],
                "image_shape": list(val.image_shape),
                "channels": val.channels,
                "files": {name: VARIANT_FILES[name] for name in report["variants"]},
                "opset": p.onnx_opset,
            },
        )
        write_json(staged.path(paths.report("optimize")), report)
        for name, m in report["variants"].items():
            log.info(
                "%-15s %8.0f bytes (%5.1fx smaller), val accuracy %.4f, agreement %.4f, "
                "speed-up %s",
                name,
                m["bytes"],
                m["size_ratio"],
                m["val_accuracy"],
                m["agreement"],
                ", ".join(f"b{b} {m[f'speedup_b{b}']:.2f}x" for b in p.latency_batch_sizes),
            )
    metrics = flat_metrics(report)
    tracker.log_metrics(metrics)
    for name in report["variants"]:
        tracker.log_artifact(out / VARIANT_FILES[name], "onnx")
    variants = report["variants"].values()
    return {
        "smallest_size_ratio": metrics["smallest_size_ratio"],
        **{
            f"best_speedup_b{b}": max(m[f"speedup_b{b}"] for m in variants)
            for b in p.latency_batch_sizes
        },
    }
