"""params.yaml, read once into frozen, validated models.

Every section is a pydantic model with ``extra="forbid"`` and bounds on each number, so a
typo or an out-of-range value fails before any stage runs, naming the key.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.errors import ConfigError

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Side = Annotated[int, Field(ge=1, le=4096)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommonParams(_Section):
    seed: int = Field(42, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mlflow_experiment: str = Field("lepton", min_length=1)
    # a training split whose float32 pixels exceed this is read from disk in chunks (pretrain)
    memory_budget_mb: int = Field(2048, ge=16, le=10_000_000)


class RuntimeParams(_Section):
    executor: Literal["local", "docker"] = "local"
    # shared: DAG runs work in this workspace, one task at a time (queued on its lock);
    # per_run: each DAG run in its own (.lepton/workspaces/<run>; pipelines/workspaces.py);
    # per_task: scale-out, each task in a clean checkout, data through the DVC remote
    # (pipelines/scale_out.py)
    workspace: Literal["shared", "per_run", "per_task"] = "shared"
    max_active_tasks: int = Field(4, ge=1, le=256)  # per_task only: tasks of a run at once
    gpu_pool: str | None = None  # Airflow pool for the GPU stages (its slots = GPUs)
    gpu_queue: str | None = None  # Celery queue of the GPU workers
    schedule: str | None = "@daily"
    retries: int = Field(2, ge=0, le=10)
    retry_delay_seconds: int = Field(30, ge=0, le=3600)
    docker_image: str = Field("lepton-pipelines:latest", min_length=1)
    docker_gpus: int = Field(-1, ge=-1, le=64)
    docker_network_mode: str = "bridge"
    # lepton run: stages forked from one warm process that imported MLflow, torch and
    # Lightning once (pipelines/stage_runner.py); false = each stage a fresh process
    stage_runner: bool = True


class IngestParams(_Section):
    source: Literal["digits", "parquet", "csv", "npz", "idx", "images"] = "digits"
    path: str | None = None
    labels_path: str | None = None
    label_column: str = Field("label", min_length=1)
    # [height, width] of flat rows, or [height, width, channels] for colour rows (channel last)
    image_shape: tuple[Side, Side] | tuple[Side, Side, Literal[1, 3]] | None = None
    num_classes: int | None = Field(None, ge=2, le=100_000)
    # [height, width] every image is resized to (antialiased bilinear); null = keep the size
    resize: tuple[Side, Side] | None = None

    @model_validator(mode="after")
    def _path_matches_source(self) -> IngestParams:
        if self.source != "digits" and not self.path:
            raise ValueError(f"ingest.path is required when ingest.source is '{self.source}'")
        if self.source == "idx" and not self.labels_path:
            raise ValueError("ingest.labels_path is required when ingest.source is 'idx'")
        return self


class CompressParams(_Section):
    compression_level: int = Field(9, ge=1, le=22)
    byte_stream_split: bool = False
    use_dictionary: bool = False
    row_group_size: int = Field(65536, ge=64, le=10_000_000)
    quantize_uint8: bool = False
    pca_components: int = Field(0, ge=0, le=4096)


# the encoder's training rows under which record-level DP holds (Params.encoder_rows)
ROWS_THAT_COST_CLIENTS_NO_PRIVACY = ("no rows", "public split", "server-held rows")


class PartitionParams(_Section):
    test_fraction: Fraction = 0.2
    val_fraction: Fraction = 0.1
    labeled_fraction: float = Field(1.0, gt=0.0, le=1.0)
    num_clients: int = Field(5, ge=1, le=1000)
    skew: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = Field(0.5, gt=0.0, le=1000.0)
    min_client_rows: int = Field(10, ge=1)
    # share of the training pool declared public: it becomes the unlabeled pool that SimCLR
    # pretrains on, and no client holds it (features that cost record-level DP nothing)
    public_fraction: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _splits_leave_training_rows(self) -> PartitionParams:
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("partition.test_fraction + partition.val_fraction must be below 0.9")
        return self


class PretrainParams(_Section):
    # simclr: a CNN encoder learnt by SimCLR; scattering: a fixed ScatterNet, learnt from no
    # row (the features record-level DP needs; pipelines/models/scattering.py)
    method: Literal["simclr", "scattering"] = "simclr"
    scattering_scales: int = Field(2, ge=1, le=6)  # J: the features sit on an h/2^J grid
    scattering_orientations: int = Field(8, ge=1, le=16)  # L
    embedding_dim: int = Field(128, ge=4, le=4096)
    # colour images only: contrast = the encoder sees each pixel's colour contrast against
    # the image's mean colour (blind to hue and polarity); rgb = the standardized channels
    colour_input: Literal["contrast", "rgb"] = "contrast"
    projection_dim: int = Field(64, ge=2, le=4096)
    epochs: int = Field(150, ge=1, le=10_000)
    batch_size: int = Field(256, ge=4, le=65536)
    learning_rate: float = Field(0.002, gt=0.0, le=10.0)
    warmup_epochs: int = Field(6, ge=0, le=10_000)  # linear warm-up before the cosine decay
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    temperature: float = Field(0.2, gt=0.0, le=10.0)
    knn_k: int = Field(10, ge=1, le=1000)
    # distributed data parallel: processes per node (CPU processes or GPUs) and nodes
    strategy: Literal["single", "ddp"] = "single"
    devices: int = Field(1, ge=1, le=1024)
    num_nodes: int = Field(1, ge=1, le=1024)
    # where SimCLR trains: on the pooled unlabeled rows, or at each client on its own rows
    # (FedAvg of encoder + projection head; pipelines/federated/ssl.py)
    mode: Literal["central", "federated"] = "central"
    runtime: Literal["simulation", "flower"] = "simulation"  # federated only
    rounds: int = Field(60, ge=1, le=10_000)  # federated only
    local_epochs: int = Field(2, ge=1, le=1000)  # federated only
    client_batch_size: int = Field(256, ge=4, le=65536)  # federated only
    client_temperature: float = Field(0.2, gt=0.0, le=10.0)  # federated only
    # federated only: each client's fit ramps the round's rate up over its first steps (its
    # AdamW starts afresh every round; full-rate first steps pulled the encoder below a
    # random one's kNN probe for the first rounds)
    client_warmup_steps: int = Field(20, ge=0, le=100_000)

    @model_validator(mode="after")
    def _ddp_needs_more_than_one_process(self) -> PretrainParams:
        if self.strategy == "single" and (self.devices > 1 or self.num_nodes > 1):
            raise ValueError("pretrain.devices or pretrain.num_nodes above 1 need strategy 'ddp'")
        if self.mode == "federated" and self.strategy == "ddp":
            raise ValueError(
                "pretrain.mode 'federated' trains at the clients: use strategy 'single'"
            )
        return self


class DPParams(_Section):
    """Differential privacy of the federate stage.

    ``unit: client`` protects whole clients (DP-FedAvg: clipped updates, noise at the server;
    ``target_epsilon`` stops at the last round within it). ``unit: record`` protects each row
    of each client (DP-SGD on a linear head over fixed features at every client, one
    accountant per client; ``target_epsilon`` plans the noise multiplier before training).
    """

    enabled: bool = False
    unit: Literal["client", "record"] = "client"
    clip_norm: float = Field(1.0, gt=0.0, le=1e6)
    noise_multiplier: float = Field(1.0, gt=0.0, le=1e4)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    target_epsilon: float | None = Field(None, gt=0.0, le=1e6)
    # record only
    sample_rate: float = Field(1.0, gt=0.0, le=1.0)  # Poisson sampling rate q of a local step
    accountant: Literal["rdp", "prv"] = "prv"
    count_noise_multiplier: float = Field(20.0, gt=0.0, le=1e6)  # σ of each client's row count
    average_decay: float = Field(0.9, ge=0.0, lt=1.0)  # EMA of the global head over rounds
    # features centred on the server's val rows and, when > 0, projected onto their top
    # principal directions before DP-SGD (pipelines/federated/feature_projection.py)
    feature_components: int = Field(0, ge=0, le=65536)


class FederateParams(_Section):
    runtime: Literal["simulation", "flower"] = "simulation"
    secure_aggregation: bool = False
    rounds: int = Field(36, ge=1, le=10_000)
    local_epochs: int = Field(2, ge=1, le=1000)
    # a client whose local_epochs come to fewer optimizer steps trains more epochs; the
    # committed params.yaml sets 20 (and augment: true), code that builds FederateParams
    # itself gets the plain client step
    min_local_steps: int = Field(0, ge=0, le=1_000_000)
    batch_size: int = Field(16, ge=1, le=65536)
    learning_rate: float = Field(0.002, gt=0.0, le=10.0)
    augment: bool = False  # clients train on random views of their rows (augment.py)
    client_fraction: float = Field(1.0, gt=0.0, le=1.0)
    min_clients: int = Field(1, ge=1, le=100_000)
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0.0, le=100.0)
    server_learning_rate: float = Field(1.0, gt=0.0, le=100.0)
    server_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    server_beta2: float = Field(0.99, ge=0.0, lt=1.0)
    server_tau: float = Field(1e-3, gt=0.0, le=1.0)
    aggregator: Literal["mean", "median", "trimmed_mean", "krum"] = "mean"
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    byzantine_clients: int = Field(1, ge=0, le=100_000)
    krum_selected: int = Field(1, ge=1, le=100_000)
    max_update_norm: float | None = Field(None, gt=0.0)
    client_timeout_seconds: float | None = Field(None, gt=0.0)
    dp: DPParams = DPParams()

    @model_validator(mode="after")
    def _secure_aggregation_needs_flower_and_the_mean(self) -> FederateParams:
        if not self.secure_aggregation:
            return self
        problems = []
        if self.runtime != "flower":
            problems.append("federate.runtime 'flower'")
        if self.aggregator != "mean":
            problems.append("federate.aggregator 'mean' (robust rules need each update)")
        if self.max_update_norm is not None:
            problems.append("no federate.max_update_norm (updates are masked)")
        if self.dp.enabled:
            problems.append("federate.dp.enabled false")
        if problems:
            raise ValueError("federate.secure_aggregation needs " + ", ".join(problems))
        return self

    @model_validator(mode="after")
    def _dp_needs_the_mean(self) -> FederateParams:
        if self.dp.enabled and self.aggregator != "mean":
            raise ValueError(
                "federate.dp.enabled needs federate.aggregator 'mean' (the noise calibration "
                f"assumes a clipped sum), got '{self.aggregator}'"
            )
        return self


class FederationParams(_Section):
    """Where the sites are: a loopback deployment on this machine, or a running federation.

    With ``superlink`` set (remote mode) the sites hold their rows: partition writes no client
    shards, and the Flower runs of pretrain and federate are submitted to that SuperLink's
    Control API, which waits for ``sites`` SuperNodes (each started with ``lepton site join``).
    """

    superlink: str | None = Field(None, pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")
    root_certificates: str | None = None  # PEM of the CA that signed the SuperLink's certificate
    insecure: bool = False  # remote mode without TLS: trusted networks and tests only
    sites: int = Field(3, ge=1, le=100_000)  # SuperNodes a remote run waits for
    connect_timeout_seconds: float = Field(30.0, gt=0.0, le=3600.0)
    site_wait_seconds: float = Field(300.0, gt=0.0, le=86_400.0)

    @property
    def remote(self) -> bool:
        """Whether the sites run elsewhere (a SuperLink address is set)."""
        return self.superlink is not None

    @model_validator(mode="after")
    def _remote_needs_tls_or_insecure(self) -> FederationParams:
        if self.remote and self.root_certificates is None and not self.insecure:
            raise ValueError(
                "federation.superlink needs federation.root_certificates (the CA certificate, "
                "PEM) or federation.insecure true"
            )
        if self.root_certificates is not None and self.insecure:
            raise ValueError(
                "federation.root_certificates and federation.insecure exclude each other"
            )
        return self


class PrivacyParams(_Section):
    """The privacy budget across pipeline runs (read by federate and register)."""

    max_epsilon: float | None = Field(None, gt=0.0, le=1e6)


class QuantumParams(_Section):
    n_qubits: int = Field(4, ge=1, le=20)
    reps: int = Field(2, ge=1, le=10)
    entanglement: Literal["linear", "full", "circular"] = "linear"
    backend: Literal["torch", "qiskit-ml", "reference", "aer"] = "torch"
    train_samples: int | None = Field(None, ge=1, le=10_000_000)
    batch_size: int = Field(64, ge=1, le=65536)
    epochs: int = Field(80, ge=1, le=10_000)
    learning_rate: float = Field(0.01, gt=0.0, le=10.0)
    score_on_aer: bool = True
    aer_shots: int | None = Field(1024, ge=1, le=10_000_000)
    aer_depolarizing_1q: float = Field(0.001, ge=0.0, le=0.75)
    aer_depolarizing_2q: float = Field(0.01, ge=0.0, le=0.9375)


class OptimizeParams(_Section):
    onnx_opset: int = Field(17, ge=13, le=23)
    latency_batch_sizes: tuple[Annotated[int, Field(ge=1, le=65536)], ...] = (1, 256)
    latency_repeats: int = Field(30, ge=1, le=10_000)
    latency_threads: int = Field(1, ge=1, le=256)
    calibration_rows: int = Field(256, ge=1, le=1_000_000)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # share of every conv's channels that structured pruning removes; 0 = no pruned variant
    prune_ratio: float = Field(0.5, ge=0.0, le=0.5)
    # the distilled student's widths against the teacher's; 0 = no distilled variant
    student_width: float = Field(0.5, ge=0.0, le=1.0)
    distill_epochs: int = Field(60, ge=1, le=10_000)
    distill_batch_size: int = Field(64, ge=1, le=65536)
    distill_learning_rate: float = Field(0.003, gt=0.0, le=1.0)
    distill_temperature: float = Field(4.0, gt=0.0, le=100.0)
    distill_soft_weight: float = Field(0.9, ge=0.0, le=1.0)


class EvaluateParams(_Section):
    # the champion is the smallest (then fastest) ONNX variant whose val accuracy is at most
    # this much below onnx_fp32's
    max_accuracy_drop: float = Field(0.005, ge=0.0, le=1.0)


class RegisterParams(_Section):
    model_name: str = Field("lepton-digits", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    accuracy_floor: float = Field(0.95, ge=0.0, le=1.0)
    # the floor for a model trained with record-level DP (privacy costs accuracy)
    dp_accuracy_floor: float = Field(0.9, ge=0.0, le=1.0)
    max_regression: float = Field(0.0, ge=0.0, le=1.0)


with warnings.catch_warnings():
    # BaseModel's metaclass has an ABC ``register``; the stage named register needs the field.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Params(_Section):
        """All of params.yaml."""

        common: CommonParams = CommonParams()
        runtime: RuntimeParams = RuntimeParams()
        ingest: IngestParams = IngestParams()
        compress: CompressParams = CompressParams()
        partition: PartitionParams = PartitionParams()
        pretrain: PretrainParams = PretrainParams()
        federate: FederateParams = FederateParams()
        federation: FederationParams = FederationParams()
        privacy: PrivacyParams = PrivacyParams()
        quantum: QuantumParams = QuantumParams()
        optimize: OptimizeParams = OptimizeParams()
        evaluate: EvaluateParams = EvaluateParams()
        register: RegisterParams = RegisterParams()

        def encoder_rows(self) -> str:
            """Whose rows the pretrained encoder learns from: ``"no rows"`` (the fixed
            scattering transform), ``"client rows"`` (federated SimCLR, or central SimCLR on
            the pooled training rows), ``"public split"`` (``partition.public_fraction``) or
            ``"server-held rows"`` (remote mode: the workspace's own rows)."""
            if self.pretrain.method == "scattering":
                return "no rows"
            if self.pretrain.mode == "federated":
                return "client rows"
            if self.federation.remote:
                return "server-held rows"
            return "public split" if self.partition.public_fraction > 0 else "client rows"

        @model_validator(mode="after")
        def _remote_sites_need_flower(self) -> Params:
            if not self.federation.remote:
                return self
            if self.partition.public_fraction > 0:
                raise ValueError(
                    "partition.public_fraction holds client rows out as public; with "
                    "federation.superlink every workspace row is server-held already: set it 0"
                )
            if self.federate.runtime != "flower":
                raise ValueError(
                    "federation.superlink (remote sites) needs federate.runtime 'flower'"
                )
            if self.pretrain.mode == "federated" and self.pretrain.runtime != "flower":
                raise ValueError(
                    "federation.superlink with pretrain.mode 'federated' needs "
                    "pretrain.runtime 'flower'"
                )
            return self

        @model_validator(mode="after")
        def _record_dp_needs_features_that_saw_no_client_row(self) -> Params:
            dp = self.federate.dp
            if not (dp.enabled and dp.unit == "record"):
                return self
            if self.encoder_rows() not in ROWS_THAT_COST_CLIENTS_NO_PRIVACY:
                raise ValueError(
                    "federate.dp.unit 'record' needs features that saw no client row: "
                    f"SimCLR (pretrain.method '{self.pretrain.method}', mode "
                    f"'{self.pretrain.mode}') here trains the encoder on the clients' rows "
                    "without noise, which voids a record-level guarantee; use "
                    "pretrain.method 'scattering', or central SimCLR on a public split "
                    "(partition.public_fraction > 0) or on server-held rows "
                    "(federation.superlink)"
                )
            if self.federate.strategy != "fedavg":
                raise ValueError(
                    "federate.dp.unit 'record' trains a linear head with FedAvg: set "
                    f"federate.strategy 'fedavg' (got '{self.federate.strategy}')"
                )
            return self

        @model_validator(mode="after")
        def _qubits_fit_the_embedding(self) -> Params:
            if self.quantum.n_qubits > self.pretrain.embedding_dim:
                raise ValueError(
                    f"quantum.n_qubits ({self.quantum.n_qubits}) must not exceed "
                    f"pretrain.embedding_dim ({self.pretrain.embedding_dim})"
                )
            return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected section.key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` override set."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return merged


def validate_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping; a ConfigError names the file and the first bad keys."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            message = err["msg"].removeprefix("Value error, ")
            shown = f"{key}: {message}"
            if (
                "input" in err
                and err["type"] != "extra_forbidden"
                and not isinstance(err["input"], dict)
            ):
                shown += f" (got {err['input']!r})"
            problems.append(shown)
        raise ConfigError(f"{source}: invalid params: " + "; ".join(problems)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (plus overrides) into a validated, frozen :class:`Params`."""
    path = Path(path)
    raw = read_params_mapping(path)
    return validate_params(apply_overrides(raw, overrides or []), source=str(path))


def read_params_mapping(path: str | Path, text: str | None = None) -> dict[str, Any]:
    """params.yaml (or ``text`` meant for it) as a plain mapping, not yet validated."""
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found")
        text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def write_overrides(path: Path, overrides: list[str]) -> None:
    """Write ``section.key=value`` overrides into params.yaml, keeping its comments.

    The new text is built in memory and validated as a whole before anything is written;
    then it replaces the file atomically. A refused override leaves params.yaml
    byte-identical.
    """
    from io import StringIO

    from ruamel.yaml import YAML

    from pipelines.io import write_text_atomic

    yaml = YAML()
    data = yaml.load(path.read_text())
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not hasattr(node, "setdefault"):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[keys[-1]] = value
    buffer = StringIO()
    yaml.dump(data, buffer)
    new_text = buffer.getvalue()
    validate_params(read_params_mapping(path, new_text), source=str(path))
    write_text_atomic(path, new_text)
