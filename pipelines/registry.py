"""The single list of pipeline stages.

Everything else is derived from it: ``dvc.yaml`` (``lepton dvc render``), the Airflow DAG
(one task per stage), and ``lepton stage run NAME``. Keep this module free of heavy
imports: the Airflow DAG processor imports it on every parse.
"""

from __future__ import annotations

from dataclasses import dataclass

# ingest's source files live outside DVC's view (any path, a whole folder). The DVC stage
# SOURCE_PROBE, which is not a pipeline stage, writes their fingerprint (paths, sizes,
# sha256) to SOURCE_FINGERPRINT on every `dvc repro`, and a stage that lists that file in
# its deps re-runs when the source changes. See pipelines/data/source_files.py.
SOURCE_PROBE = "ingest_source"
SOURCE_FINGERPRINT = "data/source.json"
SOURCE_PROBE_COMMAND = "lepton dvc fingerprint-source"


@dataclass(frozen=True)
class Plot:
    """A file DVC can plot: an image, or a CSV drawn as ``y`` against ``x``."""

    path: str
    x: str | None = None
    y: str | None = None
    title: str | None = None


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its name is the module, params section, DVC stage and task id."""

    name: str
    description: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    plots: tuple[Plot, ...] = ()
    headline: str = ""
    needs_gpu: bool = False
    timeout_minutes: int = 30
    shared_params: tuple[str, ...] = ()

    @property
    def entry_point(self) -> str:
        """Dotted path of the function that runs the stage: ``module:function``."""
        return f"pipelines.stages.{self.name}:run"

    @property
    def params_sections(self) -> tuple[str, ...]:
        """params.yaml sections the stage reads: ``common``, its own, and shared ones."""
        return ("common", self.name, *self.shared_params)

    @property
    def source_file(self) -> str:
        """The stage's own module, a dependency of the stage."""
        return f"pipelines/stages/{self.name}.py"

    @property
    def reads_source(self) -> bool:
        """Whether the stage reads the user's source files (through their fingerprint)."""
        return SOURCE_FINGERPRINT in self.deps

    @property
    def dvc_targets(self) -> tuple[str, ...]:
        """DVC stages one run of this stage reproduces: the source probe first, if it reads it."""
        return (SOURCE_PROBE, self.name) if self.reads_source else (self.name,)

    @property
    def code_deps(self) -> tuple[str, ...]:
        """The stage's module and every ``pipelines/`` file it imports, read from the code."""
        from pipelines.code_deps import code_dependencies

        return code_dependencies(self.source_file)

    @property
    def all_deps(self) -> tuple[str, ...]:
        """Code and data dependencies, as DVC sees them."""
        return (*self.code_deps, *self.deps)


STAGES: tuple[Stage, ...] = (
    Stage(
        name="ingest",
        description="Read digits or user files, validate, write one Parquet table.",
        deps=(SOURCE_FINGERPRINT,),
        outs=("data/raw",),
        metrics=("reports/ingest.json",),
        headline="rows",
        timeout_minutes=20,
    ),
    Stage(
        name="compress",
        description="zstd Parquet with optional uint8 / PCA; ratio, MB/s and reconstruction error.",
        deps=("data/raw",),
        outs=("data/compressed",),
        metrics=("reports/compress.json",),
        headline="compression_ratio",
        timeout_minutes=20,
    ),
    Stage(
        name="partition",
        description="Test / val splits, unlabeled pool, labeled fraction, K client shards.",
        deps=("data/compressed",),
        outs=("data/partitions",),
        metrics=("reports/partition.json",),
        plots=(Plot("data/partitions/client_labels.png"),),
        headline="labeled_rows",
        timeout_minutes=20,
        shared_params=("federation",),
    ),
    Stage(
        name="pretrain",
        description=(
            "SimCLR (NT-Xent) pretraining of the encoder, or a fixed scattering transform; "
            "kNN and linear probes."
        ),
        deps=("data/partitions",),
        outs=("models/pretrain",),
        metrics=("reports/pretrain.json",),
        plots=(
            Plot("models/pretrain/history.csv", x="epoch", y="train_loss", title="SimCLR loss"),
        ),
        headline="val_knn_accuracy",
        needs_gpu=True,
        timeout_minutes=120,
        shared_params=("federation",),
    ),
    Stage(
        name="federate",
        description="Federated fine-tuning (FedAvg, FedProx, FedAdam; robust; DP) of K clients.",
        deps=("data/partitions", "models/pretrain"),
        outs=("models/federate",),
        metrics=("reports/federate.json",),
        plots=(
            Plot(
                "models/federate/rounds.csv",
                x="round",
                y="val_accuracy",
                title="FedAvg val accuracy",
            ),
        ),
        headline="val_accuracy",
        needs_gpu=True,
        timeout_minutes=180,
        shared_params=("privacy", "federation"),
    ),
    Stage(
        name="quantum",
        description="Hybrid quantum-classical head (qiskit) beside a classical head of equal size.",
        deps=("data/partitions", "models/federate"),
        outs=("models/quantum",),
        metrics=("reports/quantum.json",),
        headline="hybrid_test_accuracy",
        needs_gpu=True,
        timeout_minutes=120,
    ),
    Stage(
        name="optimize",
        description="Static int8, pruned and distilled ONNX variants, measured in onnxruntime.",
        deps=("data/partitions", "models/federate", "reports/federate.json"),
        outs=("models/optimize",),
        metrics=("reports/optimize.json",),
        headline="smallest_size_ratio",
        timeout_minutes=30,
    ),
    Stage(
        name="evaluate",
        description="Every model variant on the test set: accuracy, macro-F1, per-client, plots.",
        deps=(
            "data/partitions",
            "models/federate",
            "models/quantum",
            "models/optimize",
            "reports/optimize.json",
            "reports/federate.json",
        ),
        outs=("reports/evaluate",),
        metrics=("reports/metrics.json",),
        plots=(Plot("reports/evaluate"),),
        headline="test_accuracy",
        timeout_minutes=30,
    ),
    Stage(
        name="register",
        description="Register the model in MLflow: alias candidate; champion if gates pass.",
        deps=(
            "reports/metrics.json",
            "reports/federate.json",
            "models/optimize",
            "models/federate",
            "models/quantum",
            "data/partitions/test.parquet",
            "data/raw/manifest.json",
        ),
        outs=(),
        metrics=("reports/register.json",),
        headline="version",
        timeout_minutes=15,
        shared_params=("privacy",),
    ),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    """Return the stage called ``name``; the error lists the known names."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage '{name}'; known stages: {', '.join(STAGE_NAMES)}")


def upstream_of(name: str) -> tuple[str, ...]:
    """Names of the stages whose outputs ``name`` reads (its direct upstream)."""
    stage = get_stage(name)
    producers = []
    for other in STAGES:
        produced = (*other.outs, *other.metrics)
        if other.name != name and any(
            dep == out or dep.startswith(out.rstrip("/") + "/")
            for dep in stage.deps
            for out in produced
        ):
            producers.append(other.name)
    return tuple(producers)
