"""Register the chosen model in the MLflow model registry and apply the promotion gates.

The chosen variant (see ``evaluate``) is logged with its signature and an input example:
an ONNX file, or, when the quantum stage's hybrid head won on val, an MLflow model from code
(:mod:`pipelines.quantum.pyfunc_model`) carrying the encoder's and head's safetensors. It is
registered as a new version of ``register.model_name`` and given the alias ``candidate``.
It becomes ``champion`` only if every gate passes:

- accuracy floor: test accuracy >= ``register.accuracy_floor``, or
  ``register.dp_accuracy_floor`` for a model trained under record-level DP;
- no regression: test accuracy >= the current champion's - ``register.max_regression``;
- privacy budget: with ``privacy.max_epsilon`` set, the federated model's ε (from
  ``reports/federate.json``; unbounded without DP) is within it.

The version carries tags that lead back to the data: pipeline run, git commit, dvc.lock hash,
and the content hash of the ingested data; and its privacy: unit (``none``, ``client`` or
``record``), ε and δ.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from pipelines.config import Params, RegisterParams
from pipelines.federated.privacy import DELTA_TAG, EPSILON_TAG, UNIT_TAG
from pipelines.io import Paths, read_image_table, read_json, write_json
from pipelines.tracking import StageTracker, lineage_tags, pipeline_run_key, tracking_uri

log = logging.getLogger(__name__)


def evaluate_gates(
    test_accuracy: float,
    champion_accuracy: float | None,
    p: RegisterParams,
    epsilon: float = math.inf,
    max_epsilon: float | None = None,
    dp_unit: str = "none",
) -> dict[str, bool]:
    """Which promotion gates pass for a model of ``test_accuracy`` and privacy ``epsilon``
    (``inf`` for a model trained without differential privacy). A model trained under
    record-level DP (``dp_unit`` ``record``) meets ``p.dp_accuracy_floor`` instead of
    ``p.accuracy_floor``."""
    floor = p.dp_accuracy_floor if dp_unit == "record" else p.accuracy_floor
    return {
        "accuracy_floor": test_accuracy >= floor,
        "no_regression": champion_accuracy is None
        or test_accuracy >= champion_accuracy - p.max_regression,
        "privacy_budget": max_epsilon is None or epsilon <= max_epsilon,
    }


def current_champion(client, name: str) -> tuple[str | None, float | None]:
    """(version, test accuracy) of the model's ``champion`` alias, if there is one."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    accuracy = version.tags.get("test_accuracy")
    return version.version, float(accuracy) if accuracy is not None else None


# what an ONNX model needs to be served: MLflow infers the same list by loading the model
# in a subprocess and watching its imports, which took 6 s of a 12 s register stage here
ONNX_MODEL_PACKAGES = ("mlflow", "numpy", "onnx", "onnxruntime")


def pinned_requirements(packages: tuple[str, ...]) -> list[str]:
    """``name==version`` of each of ``packages`` as installed here."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in packages]


def log_onnx_model(paths: Paths, variant: str, example_input: np.ndarray, model_name: str):
    """Log and register the ONNX file of ``variant`` in the active run; returns its info.
    The model answers with ``logits``, ``probabilities`` and ``label`` (see
    :mod:`pipelines.models.onnx_export`); its pip requirements are
    :data:`ONNX_MODEL_PACKAGES` at their installed versions."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    from pipelines.models.onnx_export import INPUT_NAME, onnx_session

    optimized = paths.model_dir("optimize")
    model_path = optimized / read_json(optimized / "manifest.json")["files"][variant]
    session = onnx_session(model_path)
    names = [o.name for o in session.get_outputs()]
    example_output = dict(zip(names, session.run(None, {INPUT_NAME: example_input}), strict=True))
    return mlflow.onnx.log_model(
        onnx.load(str(model_path)),
        name="model",
        signature=infer_signature(example_input, example_output),
        input_example=example_input,
        pip_requirements=pinned_requirements(ONNX_MODEL_PACKAGES),
        registered_model_name=model_name,
        await_registration_for=60,
    )


def model_card(
    variant: str,
    evaluation: dict,
    compression: dict,
    data_sha256: str,
    privacy: dict[str, str],
) -> str:
    """The model version's description (Markdown): what the model is, the data it came from,
    its privacy, test metrics, and, for an ONNX variant, size and latency against fp32."""
    chosen = evaluation["variants"][variant]
    lines = [
        f"**Variant:** `{variant}`",
        f"**Data:** sha256 `{data_sha256}`",
        f"**Privacy:** unit {privacy['unit']}, ε {privacy['epsilon']}, δ {privacy['delta']}",
        f"**Test accuracy:** {chosen['test_accuracy']:.4f} (macro-F1 {chosen['test_macro_f1']:.4f};"
        f" val {chosen['val_accuracy']:.4f})",
    ]
    reference = evaluation["variants"].get("onnx_fp32")
    if reference is not None and variant != "onnx_fp32":
        lines.append(f"**fp32 ONNX test accuracy:** {reference['test_accuracy']:.4f}")
    measured = compression.get("variants", {}).get(variant)
    if measured is not None:
        lines.append(
            f"**Size:** {measured['bytes'] / 1024:.1f} KB, {measured['size_ratio']:.1f}x smaller"
            f" than fp32; {int(measured['parameters'])} parameters"
        )
        cpu = compression.get("cpu", {})
        threads = compression.get("latency_threads", 1)
        for key in sorted(k for k in measured if k.startswith("latency_ms_b")):
            batch = key.rsplit("_b", 1)[1]
            lines.append(
                f"**Latency, batch {batch}:** {measured[key]:.3f} ms"
                f" ({measured[f'speedup_b{batch}']:.2f}x as fast as fp32; {threads} thread,"
                f" {cpu.get('model', 'CPU')})"
            )
    lines.append(
        "**Input:** `images` float32 (n, c, h, w) in [0, 1]. **Output:** `label`,"
        " `probabilities`, `logits`."
    )
    return "\n\n".join(lines)


def log_hybrid_model(paths: Paths, example_input: np.ndarray, model_name: str):
    """Log and register encoder + hybrid head as an MLflow model from code (no pickle)."""
    from pathlib import Path

    import mlflow
    from mlflow.models import infer_signature

    from pipelines.models.encoder import load_classifier
    from pipelines.quantum import pyfunc_model
    from pipelines.quantum.hybrid import load_head

    encoder = load_classifier(paths.model_dir("federate")).encoder.eval()
    head = load_head(paths.model_dir("quantum"), "hybrid")
    example_output = pyfunc_model.labelled_outputs(
        pyfunc_model.hybrid_logits(encoder, head, example_input)
    )
    package = Path(pyfunc_model.__file__).resolve().parents[1]
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=pyfunc_model.__file__,
        artifacts={
            "encoder": str(paths.model_dir("federate")),
            "head": str(paths.model_dir("quantum")),
        },
        code_paths=[str(package)],
        signature=infer_signature(example_input, example_output),
        input_example=example_input,
        registered_model_name=model_name,
        await_registration_for=60,
    )


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict[str, float]:
    """Log + register the chosen model; alias candidate, champion if the gates pass."""
    import mlflow

    p = params.register
    metrics = read_json(paths.report("evaluate"))
    variant = metrics["chosen_variant"]
    test_accuracy = float(metrics["test_accuracy"])
    example_input = read_image_table(paths.partitions / "test.parquet").images[:2]

    client = tracker.client
    champion_version, champion_accuracy = current_champion(client, p.model_name)
    federate_report = read_json(paths.report("federate"))
    private = bool(federate_report.get("dp"))
    epsilon = float(federate_report["epsilon"]) if private else math.inf
    dp_unit = federate_report.get("dp_unit", "client") if private else "none"
    gates = evaluate_gates(
        test_accuracy, champion_accuracy, p, epsilon, params.privacy.max_epsilon, dp_unit
    )

    mlflow.set_tracking_uri(tracking_uri(paths.root))
    mlflow.set_registry_uri(tracking_uri(paths.root))
    with mlflow.start_run(run_id=tracker.run_id):
        if variant == "quantum_hybrid":
            info = log_hybrid_model(paths, example_input, p.model_name)
        else:
            info = log_onnx_model(paths, variant, example_input, p.model_name)
    version = str(info.registered_model_version)
    raw_manifest = read_json(paths.raw / "manifest.json")
    tags = {
        "test_accuracy": f"{test_accuracy:.6f}",
        "variant": variant,
        "lepton.pipeline_run": pipeline_run_key(),
        "lepton.run_id": tracker.run_id,
        "lepton.data_sha256": raw_manifest.get("content_sha256", "unknown"),
        EPSILON_TAG: "inf" if math.isinf(epsilon) else f"{epsilon:.6g}",
        UNIT_TAG: dp_unit,
        DELTA_TAG: str(federate_report["delta"]) if private else "none",
        **lineage_tags(paths.root),
        **{f"gate.{name}": str(ok).lower() for name, ok in gates.items()},
    }
    for key, value in tags.items():
        client.set_model_version_tag(p.model_name, version, key, value)
    card = model_card(
        variant,
        metrics,
        read_json(paths.report("optimize")),
        tags["lepton.data_sha256"],
        {"unit": dp_unit, "epsilon": tags[EPSILON_TAG], "delta": tags[DELTA_TAG]},
    )
    client.update_model_version(p.model_name, version, description=card)
    client.set_registered_model_alias(p.model_name, "candidate", version)
    promoted = all(gates.values())
    if promoted:
        client.set_registered_model_alias(p.model_name, "champion", version)
        log.info("version %s is the new champion (test accuracy %.4f)", version, test_accuracy)
    else:
        failed = [name for name, ok in gates.items() if not ok]
        log.warning("version %s stays candidate: gates failed: %s", version, ", ".join(failed))

    result = {
        "version": int(version),
        "promoted": int(promoted),
        "test_accuracy": test_accuracy,
        "previous_champion_version": int(champion_version) if champion_version else 0,
        **{f"gate_{name}": int(ok) for name, ok in gates.items()},
    }
    report = {**result, "model_name": p.model_name, "variant": variant, "model_uri": info.model_uri}
    tmp = paths.report("register").with_suffix(".json.tmp")
    write_json(tmp, report)
    tmp.replace(paths.report("register"))
    tracker.set_tags(
        {"lepton.registered_version": version, "lepton.promoted": str(promoted).lower()}
    )
    tracker.set_tags({"lepton.registered_model": f"{p.model_name}/{version}"}, on_parent=True)
    return {k: float(v) for k, v in result.items()}
