"""Every model variant on the test set: accuracy, macro-F1, per-client accuracy, plots.

Variants: the federated torch model, every ONNX variant the optimize stage built (fp32,
static int8, pruned, distilled, and their int8; scored in onnxruntime), and the quantum
stage's hybrid head beside its classical head of equal size. Per-client accuracy is the
accuracy a client would see on its own label mix: the test set's per-class recall weighted
by the client's label histogram.

The deployable variant (the one ``register`` logs), the *champion*, is chosen on the val
set: among the ONNX variants whose val accuracy is at most ``evaluate.max_accuracy_drop``
below ``onnx_fp32``'s, the smallest file, then the fastest at the largest latency batch
(:func:`choose_deployable`). The quantum stage's hybrid head replaces that choice only when
its val accuracy beats every other variant's, its classical twin's included (ties go to the
classical models). Under record-level DP (``federate.dp.unit: record``) the hybrid head is
never chosen: the quantum stage trains it on the clients' rows without noise, so only the
federated model's exports carry the guarantee.

``compression.png`` plots every ONNX variant's size against its latency, coloured by test
accuracy (DVC plots and MLflow); ``compression.csv`` holds the same table.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines.config import EvaluateParams, Params
from pipelines.io import (
    Paths,
    atomic_outputs,
    read_client_shards,
    read_image_table,
    read_json,
    write_json,
)
from pipelines.tracking import StageTracker

log = logging.getLogger(__name__)

REFERENCE = "onnx_fp32"


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]``."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def macro_f1(matrix: np.ndarray) -> float:
    """Unweighted mean of per-class F1 (classes absent from both sides count as 0)."""
    tp = np.diag(matrix).astype(float)
    precision = np.divide(tp, matrix.sum(0), out=np.zeros_like(tp), where=matrix.sum(0) > 0)
    recall = np.divide(tp, matrix.sum(1), out=np.zeros_like(tp), where=matrix.sum(1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def per_client_accuracy(matrix: np.ndarray, histograms: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy on each client's label mix: per-class recall weighted by its histogram."""
    support = matrix.sum(1)
    recall = np.divide(np.diag(matrix), support, out=np.zeros(len(matrix)), where=support > 0)
    return {name: float((hist / hist.sum()) @ recall) for name, hist in histograms.items()}


def score(
    labels: np.ndarray, logits: np.ndarray, num_classes: int, histograms: dict[str, np.ndarray]
) -> tuple[dict, np.ndarray]:
    """Metrics of one variant on one split, and its confusion matrix."""
    predictions = logits.argmax(1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    metrics = {
        "accuracy": float((predictions == labels).mean()),
        "macro_f1": macro_f1(matrix),
        "per_client_accuracy": per_client_accuracy(matrix, histograms),
    }
    return metrics, matrix


def choose_deployable(
    variants: dict[str, dict],
    compression: dict[str, dict],
    p: EvaluateParams,
    record_private: bool = False,
) -> str:
    """The variant ``register`` logs, chosen on val accuracy (see the module docstring).

    ``compression``: the optimize report's per-variant ``bytes`` and ``latency_ms_b<n>``
    (the ONNX variants). Among those whose val accuracy is within ``p.max_accuracy_drop``
    of ``onnx_fp32``'s, the smallest, then the fastest at the largest batch measured.
    ``quantum_hybrid`` only when it is strictly better on val than every other variant and
    the federated model is not ``record_private`` (the hybrid head saw the rows unnoised).
    """
    floor = variants[REFERENCE]["val_accuracy"] - p.max_accuracy_drop
    eligible = [
        name
        for name in compression
        if name in variants and variants[name]["val_accuracy"] >= floor - 1e-12
    ]
    chosen = min(eligible or [REFERENCE], key=lambda name: _size_then_latency(compression[name]))
    hybrid = None if record_private else variants.get("quantum_hybrid")
    if hybrid is not None and all(
        hybrid["val_accuracy"] > v["val_accuracy"]
        for name, v in variants.items()
        if name != "quantum_hybrid"
    ):
        return "quantum_hybrid"
    return chosen


def largest_batch_latency(metrics: dict) -> str | None:
    """The ``latency_ms_b<n>`` key of the largest batch a variant was timed at (None if
    it was not timed)."""
    keys = [k for k in metrics if k.startswith("latency_ms_b")]
    return max(keys, key=lambda k: int(k.rsplit("_b", 1)[1]), default=None)


def _size_then_latency(metrics: dict) -> tuple[float, float]:
    key = largest_batch_latency(metrics)
    return metrics["bytes"], metrics[key] if key else 0.0


def plot_compression(
    compression: dict[str, dict], variants: dict[str, dict], chosen: str, path: Path
) -> None:
    """Size (KB, log) against latency at the largest batch, one point per ONNX variant,
    coloured by test accuracy; the champion ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in compression if n in variants]
    key = largest_batch_latency(compression[REFERENCE])
    sizes = [compression[n]["bytes"] / 1024 for n in names]
    latency = [compression[n][key] for n in names]
    accuracy = [variants[n]["test_accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    points = ax.scatter(sizes, latency, c=accuracy, cmap="viridis", s=60, zorder=3)
    for name, x, y in zip(names, sizes, latency, strict=True):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if name == chosen:
            ax.scatter([x], [y], s=220, facecolors="none", edgecolors="red", zorder=4)
    ax.set_xscale("log")
    ax.set(
        xlabel="ONNX file size (KB, log scale)",
        ylabel=f"latency at batch {key.rsplit('_b', 1)[1]} (ms)",
        title="Compressed variants (ringed: champion)",
    )
    fig.colorbar(points, ax=ax, label="test accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_compression_csv(
    compression: dict[str, dict], variants: dict[str, dict], path: Path
) -> None:
    """One row per ONNX variant: size, parameters, latency, speed-ups, test accuracy."""
    names = [n for n in compression if n in variants]
    measured = [k for k in compression[REFERENCE] if k.startswith(("latency_ms_b", "speedup_b"))]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["variant", "bytes", "size_ratio", "parameters", *measured]
            + ["test_accuracy", "test_agreement"]
        )
        for name in names:
            m = compression[name]
            writer.writerow(
                [
                    name,
                    int(m["bytes"]),
                    f"{m['size_ratio']:.3f}",
                    int(m["parameters"]),
                    *(f"{m[k]:.4f}" for k in measured),
                    f"{variants[name]['test_accuracy']:.6f}",
                    f"{variants[name].get('test_agreement', float('nan')):.6f}",
                ]
            )


def plot_confusion(matrix: np.ndarray, title: str, path: Path) -> None:
    """Save a confusion-matrix heat map with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    image = ax.imshow(matrix, cmap="Blues")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    ax.set_xticks(range(len(matrix)))
    ax.set_yticks(range(len(matrix)))
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > threshold else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_per_client(variants: dict[str, dict], path: Path) -> None:
    """Grouped bars: per-client test accuracy of each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(variants)
    clients = list(next(iter(variants.values()))["per_client_accuracy"])
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, len(clients) * 1.2), 4), dpi=110)
    for k, name in enumerate(names):
        values = [variants[name]["per_client_accuracy"][c] for c in clients]
        ax.bar(np.arange(len(clients)) + k * width, values, width, label=name)
    ax.set_xticks(np.arange(len(clients)) + 0.4 - width / 2, clients, rotation=30)
    ax.set(
        ylabel="test accuracy on the client's label mix",
        ylim=(0, 1.02),
        title="Per-client accuracy",
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def variant_predictors(paths: Paths) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """name → function from images ``(n, c, h, w)`` to logits, for every model variant."""
    from pipelines.models.encoder import load_classifier
    from pipelines.models.onnx_export import onnx_logits, onnx_session
    from pipelines.models.probes import extract_features, predict_logits
    from pipelines.quantum.hybrid import load_heads

    classifier = load_classifier(paths.model_dir("federate"))
    optimized = paths.model_dir("optimize")
    predictors: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "federated": lambda x: predict_logits(classifier, x)
    }
    for name, file in read_json(optimized / "manifest.json")["files"].items():
        session = onnx_session(optimized / file)
        predictors[name] = lambda x, session=session: onnx_logits(session, x)
    encoder = classifier.encoder
    for name, head in load_heads(paths.model_dir("quantum")).items():
        predictors[f"quantum_{name}"] = lambda x, head=head: head(extract_features(encoder, x))
    return predictors


def client_histograms(paths: Paths, num_classes: int) -> dict[str, np.ndarray]:
    """Label histogram of every client shard."""
    histograms = {}
    for shard, table in read_client_shards(paths.partitions):
        histograms[shard.stem] = np.bincount(table.labels, minlength=num_classes).astype(float)
    return histograms


def site_scores(paths: Paths) -> list[dict]:
    """Each site's score of the federated model on its own held-out rows, as federate
    recorded it (``models/federate/sites.json``; remote sites only: in simulation no site
    keeps rows back)."""
    from pipelines.federated.sites import SITES_FILE

    path = paths.model_dir("federate") / SITES_FILE
    if not path.exists():
        return []
    return [s for s in read_json(path) if s.get("holdout_accuracy") is not None]


def run(params: Params, paths: Paths, tracker: StageTracker) -> dict:
    """Score every variant on val and test; write plots and reports/metrics.json."""
    test = read_image_table(paths.partitions / "test.parquet")
    val = read_image_table(paths.partitions / "val.parquet")
    histograms = client_histograms(paths, test.num_classes)
    compression = read_json(paths.report("optimize"))["variants"]
    variants: dict[str, dict] = {}
    matrices: dict[str, np.ndarray] = {}
    test_predictions: dict[str, np.ndarray] = {}
    for name, predict in variant_predictors(paths).items():
        logits = predict(test.images)
        test_predictions[name] = logits.argmax(1)
        test_metrics, matrix = score(test.labels, logits, test.num_classes, histograms)
        val_metrics, _ = score(val.labels, predict(val.images), val.num_classes, histograms)
        variants[name] = {
            "test_accuracy": test_metrics["accuracy"],
            "test_macro_f1": test_metrics["macro_f1"],
            "val_accuracy": val_metrics["accuracy"],
            "per_client_accuracy": test_metrics["per_client_accuracy"],
        }
        matrices[name] = matrix
        log.info(
            "%-18s test accuracy %.4f, macro-F1 %.4f",
            name,
            test_metrics["accuracy"],
            test_metrics["macro_f1"],
        )

    for name in compression:  # agreement with the fp32 export on the test rows
        agree = test_predictions[name] == test_predictions[REFERENCE]
        variants[name]["test_agreement"] = float(agree.mean())
    record_private = read_json(paths.report("federate")).get("dp_unit") == "record"
    chosen = choose_deployable(variants, compression, params.evaluate, record_private)
    if chosen in compression:
        log.info(
            "champion %s: %.1fx smaller than onnx_fp32, %s; test accuracy %.4f (fp32 %.4f)",
            chosen,
            compression[chosen]["size_ratio"],
            ", ".join(
                f"{v:.2f}x as fast at b{k.rsplit('_b', 1)[1]}"
                for k, v in compression[chosen].items()
                if k.startswith("speedup_b")
            ),
            variants[chosen]["test_accuracy"],
            variants[REFERENCE]["test_accuracy"],
        )
    metrics = {
        "chosen_variant": chosen,
        "test_accuracy": variants[chosen]["test_accuracy"],
        "test_macro_f1": variants[chosen]["test_macro_f1"],
        "val_accuracy": variants[chosen]["val_accuracy"],
        "accuracy_drop": variants[REFERENCE]["test_accuracy"] - variants[chosen]["test_accuracy"],
        **{
            key: compression[chosen][key]
            for key in compression.get(chosen, {})
            if key.startswith(("size_ratio", "speedup_b", "bytes", "latency_ms_b"))
        },
        "variants": variants,
        "sites": site_scores(paths),
    }
    for site in metrics["sites"]:
        log.info(
            "site %-16s federated model, held-out accuracy %.4f on %d rows (at the site)",
            site["site"],
            site["holdout_accuracy"],
            site["holdout_rows"],
        )
    out = paths.evaluate
    with atomic_outputs(dirs=[out], files=[paths.report("evaluate")]) as staged:
        for name, matrix in matrices.items():
            accuracy = variants[name]["test_accuracy"]
            plot_confusion(
                matrix,
                f"{name}: test accuracy {accuracy:.3f}",
                staged.path(out) / f"confusion_{name}.png",
            )
        plot_per_client(variants, staged.path(out) / "per_client_accuracy.png")
        plot_compression(compression, variants, chosen, staged.path(out) / "compression.png")
        write_compression_csv(compression, variants, staged.path(out) / "compression.csv")
        with (staged.path(out) / "variants.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["variant", "test_accuracy", "test_macro_f1", "val_accuracy"])
            for name, v in variants.items():
                writer.writerow(
                    [
                        name,
                        f"{v['test_accuracy']:.6f}",
                        f"{v['test_macro_f1']:.6f}",
                        f"{v['val_accuracy']:.6f}",
                    ]
                )
        write_json(staged.path(paths.report("evaluate")), metrics)

    flat = {
        f"{name}.{key}": value
        for name, v in variants.items()
        for key, value in v.items()
        if isinstance(value, float)
    }
    tracker.log_metrics(
        {
            **flat,
            "test_accuracy": metrics["test_accuracy"],
            "test_macro_f1": metrics["test_macro_f1"],
        }
    )
    tracker.set_tags({"lepton.chosen_variant": chosen})
    tracker.log_artifact(out, "evaluate")
    tracker.log_dataset(
        "test", paths.partitions / "test.parquet", _content_digest(test), "evaluation"
    )
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def _content_digest(table) -> str:
    from pipelines.io import content_sha256

    return content_sha256(table)
