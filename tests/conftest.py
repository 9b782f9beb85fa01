"""Shared fixtures: a fresh copy of the workspace to run stages, DVC and Airflow in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def share_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker (and the stages and Flower sites it starts) its
    share of the cores as torch threads, unless ``OMP_NUM_THREADS`` is set already. Two
    workers with a thread per core each on two cores made OpenMP's threads wait on each
    other: tests/model's training tests took 131 s at two threads a worker, 52 s at one
    (docs/reliability.md, "Runs side by side")."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 0:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


share_cores_between_workers()


def pytest_collection_modifyitems(config, items) -> None:
    """Run the slow tests (whole pipelines, training loops, Flower deployments: a minute or
    more each) before the quick ones, end-to-end and model tests first, each group in its
    collection order. pytest-xdist's workers, each taking the next test when it is free
    (``make test``: ``--dist load --maxschedchunk 1``), then end on quick tests at about the
    same time, instead of one worker running a last long test while the other has nothing
    left."""
    order = {"e2e": 0, "model": 1}

    def rank(item) -> tuple[int, int]:
        if item.get_closest_marker("slow") is None:
            return (1, 0)
        return (0, order.get(Path(str(item.path)).parent.name, 2))

    items.sort(key=rank)  # stable: collection order within a group


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKSPACE_FILES = ("dags", "pipelines", "params.yaml", "dvc.yaml", ".dvcignore", "pyproject.toml")

# Small enough to run the whole pipeline in about a minute on two cores.
TINY_OVERRIDES = {
    "pretrain": {"epochs": 2, "batch_size": 128},
    # the plain client step: no random views, no extra epochs on the tiny shards
    "federate": {"rounds": 2, "local_epochs": 1, "augment": False, "min_local_steps": 0},
    "quantum": {"n_qubits": 2, "reps": 1, "train_samples": 8, "batch_size": 8},
    "optimize": {
        "latency_repeats": 2,
        "latency_batch_sizes": [1, 64],
        "calibration_rows": 32,
        "distill_epochs": 2,
    },
    "register": {"accuracy_floor": 0.3},
}


def make_workspace(target: Path, overrides: dict | None = None) -> Path:
    """Copy the project's workspace files into ``target`` as a git + DVC repository."""
    target.mkdir(parents=True, exist_ok=True)
    for name in WORKSPACE_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    (target / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", target / ".dvc" / "config")
    (target / ".gitignore").write_text((REPO / ".gitignore").read_text())
    if overrides:
        params = yaml.safe_load((target / "params.yaml").read_text())
        for section, values in overrides.items():
            params.setdefault(section, {}).update(values)
        (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=ci@lepton.invalid", "-c", "user.name=ci"]
    subprocess.run([*git, "init", "-q"], cwd=target, check=True)
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "workspace"], cwd=target, check=True)
    return target


# the session's warm stage runner (``warm_stage_runner``): its variable, while it runs
SESSION_RUNNER_ENV: dict[str, str] = {}


def clean_env() -> dict[str, str]:
    """This process's environment without Airflow's, MLflow's and Lepton's variables, with
    the venv's scripts first on PATH."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_", "LEPTON_"))
    }
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def workspace_env(root: Path, stage_runner: bool = True) -> dict[str, str]:
    """Environment for commands run in a test workspace (its own MLflow and Airflow). Its
    ``lepton stage run``s are forked from the session's warm stage runner, as ``lepton run``
    forks its tasks' stages, unless ``stage_runner`` is false (each stage then starts in a
    process of its own, as under a plain ``dvc repro``)."""
    env = clean_env()
    env["LEPTON_WORKSPACE"] = str(root)
    if stage_runner:
        env.update(SESSION_RUNNER_ENV)
    return env


@pytest.fixture(scope="session", autouse=True)
def warm_stage_runner(tmp_path_factory):
    """One warm stage runner (``pipelines.stage_runner``) for the session (for each xdist
    worker): the stages that tests start through :func:`workspace_env` are forked from it
    instead of importing MLflow, torch and Lightning again, seconds of CPU each. Tests of
    a stage in its own process ask for ``workspace_env(root, stage_runner=False)``;
    ``LEPTON_TEST_FRESH_STAGES=1`` turns the runner off for the whole session."""
    from pipelines.stage_runner import running

    if os.environ.get("LEPTON_TEST_FRESH_STAGES"):
        yield
        return
    folder = tmp_path_factory.mktemp("stage-runner")
    with running(folder, clean_env(), folder / "runner.log") as runner_env:
        SESSION_RUNNER_ENV.update(runner_env)
        try:
            yield
        finally:
            SESSION_RUNNER_ENV.clear()


def run_stage(
    root: Path, stage: str, timeout: float | None = None, stage_runner: bool = True
) -> str:
    """``lepton stage run <stage>`` in workspace ``root``; returns its output (stdout, then
    stderr), fails with it. ``stage_runner`` as in :func:`workspace_env`."""
    done = subprocess.run(
        [str(BIN / "lepton"), "stage", "run", stage],
        cwd=root,
        env=workspace_env(root, stage_runner),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (stage, done.stdout[-2000:] + done.stderr[-4000:])
    return done.stdout + done.stderr


def wait_for_http(url: str, server: subprocess.Popen, output, seconds: float = 120) -> None:
    """Wait until ``url`` answers; fail with ``output()`` (the server's last words) when
    ``server`` exits first or ``seconds`` pass."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:  # refused, or an HTTP error before the app is up
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer within {seconds:g} s:\n{output()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A fresh workspace with the default params."""
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def tiny_workspace(tmp_path: Path) -> Path:
    """A fresh workspace with params small enough for a fast whole-pipeline run."""
    return make_workspace(tmp_path / "ws", TINY_OVERRIDES)


def make_federation_workspace(
    root: Path,
    clients: int = 3,
    val_rows: int = 200,
    rows_per_client: int | None = 150,
    embedding_dim: int = 16,
    shuffle_seed: int | None = None,
    encoder_kind: str = "encoder",
):
    """Digits as the federate stage reads them: ``val.parquet``, ``clients`` shards and an
    untrained pretrain encoder (seeded), or with ``encoder_kind="scattering"`` the fixed
    scattering encoder. Rows are taken in order, or shuffled with ``shuffle_seed``;
    ``rows_per_client=None`` splits every remaining row."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from pipelines.io import ImageTable, Paths, save_weights, write_image_table, write_json
    from pipelines.models.encoder import Encoder

    data = load_digits()
    table = ImageTable((data.images / 16.0).astype(np.float32), data.target.astype(np.int64), 10)
    order = np.arange(len(table))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(table))
    rest = order[val_rows:]
    if rows_per_client is not None:
        rest = rest[: clients * rows_per_client]
    paths = Paths(root)
    (paths.partitions / "clients").mkdir(parents=True)
    write_image_table(table.subset(order[:val_rows]), paths.partitions / "val.parquet")
    # the raw digits' pixel range (0..16), as partition records it for the sites
    write_json(paths.partitions / "manifest.json", {"normalization": {"low": 0.0, "high": 16.0}})
    for k, rows in enumerate(np.array_split(rest, clients)):
        write_image_table(table.subset(rows), paths.partitions / "clients" / f"client_{k}.parquet")
    torch.manual_seed(0)
    if encoder_kind == "scattering":
        from pipelines.models.scattering import ScatteringEncoder

        encoder = ScatteringEncoder((8, 8))
    else:
        encoder = Encoder(embedding_dim=embedding_dim)
    paths.model_dir("pretrain").mkdir(parents=True)
    save_weights(encoder, paths.model_dir("pretrain"), encoder.config, name="encoder")
    return paths
