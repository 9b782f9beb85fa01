"""Remote federation on loopback: a TLS SuperLink with SuperNode authentication and three
sites started with `lepton site join`, each on its own data file in its own folder, which
the pipeline never reads. The workspace holds only the server's rows."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.federated.flower_deploy import flower_bin
from tests.conftest import BIN, make_workspace, run_stage

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (flower_bin() / "flower-superlink").exists(),
        reason="the Flower environment is missing: run `make flower-setup`",
    ),
]

SITES = ("hospital-a", "hospital-b", "hospital-c")


def digits_split(seed: int = 0) -> tuple[dict[str, tuple], tuple]:
    """The digits at their own scale (0..16): three sites' rows and the server's rows."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    server, sites = order[:600], np.array_split(order[600:], len(SITES))
    images = data.images.astype(np.float32)
    return (
        {name: (images[rows], data.target[rows]) for name, rows in zip(SITES, sites, strict=True)},
        (images[server], data.target[server]),
    )


def row_digests(images: np.ndarray) -> set[str]:
    """sha256 of each row as float32 at its own scale and as the pipeline scales it."""
    digests = set()
    for scale in (1.0, 16.0):
        for row in (images / scale).astype(np.float32):
            digests.add(hashlib.sha256(row.reshape(-1).tobytes()).hexdigest())
    return digests


def site_rows_in(folder: Path, site_digests: set[str], raw_rows: list[bytes]) -> list[str]:
    """Files under ``folder`` holding a site row: any image table (each row hashed), or any
    file containing a row's float32 bytes."""
    from pipelines.io import read_image_table

    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            table = read_image_table(path)
            flat = table.images.reshape(len(table.labels), -1).astype(np.float32)
            if any(hashlib.sha256(r.tobytes()).hexdigest() in site_digests for r in flat):
                found.append(str(path))
            continue
        data = path.read_bytes()
        if any(row in data for row in raw_rows):
            found.append(str(path))
    return found


def start_site(name: str, folder: Path, superlink: str, certs: Path, key: Path):
    """``lepton site join`` for one site, as a process of its own (its log: ``site.log``)."""
    from pipelines.federated.flower_deploy import free_port

    argv = [
        str(BIN / "lepton"), "site", "join", "--superlink", superlink, "--name", name,
        "--source", "npz", "--path", str(folder / "site.npz"), "--num-classes", "10",
        "--work-dir", str(folder / "prepared"), "--root-certificates", str(certs / "ca.crt"),
        "--auth-key", str(key), "--port", str(free_port()),
    ]  # fmt: skip
    log = (folder / "site.log").open("w")
    return subprocess.Popen(
        argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


@contextlib.contextmanager
def running_federation(folder: Path, sites: dict[str, tuple]):
    """A TLS SuperLink with SuperNode authentication on loopback and one `lepton site join`
    process per site, each on its own NPZ file in ``folder/sites/<name>`` with its key
    registered; yields ``(superlink address, TLS files)``; everything stops on exit."""
    from pipelines.federated.certificates import make_certificates, make_supernode_key
    from pipelines.federated.flower_deploy import (
        FlowerDeployment,
        flower_env,
        free_port,
        start_superlink,
        stop_processes,
    )

    certs = make_certificates(folder / "certs", ["localhost"])
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    home = folder / "superlink"
    env = flower_env(home, flower_bin())
    processes = [
        start_superlink(flower_bin(), port, home / "superlink.log", env, certs, supernode_auth=True)
    ]
    try:
        admin = FlowerDeployment(home, superlink, certs.ca_certificate)
        admin.write_connection()
        for name, (x, y) in sites.items():
            site_folder = folder / "sites" / name
            site_folder.mkdir(parents=True)
            np.savez(site_folder / "site.npz", x=x, y=y)
            key, public = make_supernode_key(site_folder / "node.key")
            admin.flwr(["supernode", "register", str(public), "lepton"])
            processes.append(start_site(name, site_folder, superlink, folder / "certs", key))
        yield superlink, certs
    finally:
        stop_processes(processes)


def remote_workspace(
    folder: Path, server: tuple, superlink: str, certs, overrides: dict | None = None
) -> Path:
    """A workspace holding only the server's rows (``server.npz``), in remote mode against
    ``superlink`` over TLS; ``overrides`` go on top, per section."""
    np.savez(folder / "server.npz", x=server[0], y=server[1])
    params = {
        "ingest": {"source": "npz", "path": str(folder / "server.npz")},
        "partition": {"test_fraction": 0.3, "val_fraction": 0.3},
        "federate": {"runtime": "flower"},
        "federation": {
            "superlink": superlink,
            "root_certificates": str(certs.ca_certificate),
            "sites": len(SITES),
        },
    }
    for section, values in (overrides or {}).items():
        params.setdefault(section, {}).update(values)
    return make_workspace(folder / "ws", params)


def run_server_stages(root: Path) -> None:
    """ingest to federate in the central workspace ``root``, each `lepton stage run` forked
    from the session's warm stage runner, as `lepton run` runs them."""
    for stage in ("ingest", "compress", "partition", "pretrain", "federate"):
        run_stage(root, stage, timeout=900)


def test_remote_sites_train_without_their_rows_reaching_the_workspace(tmp_path: Path):
    sites, (server_x, server_y) = digits_split()
    with running_federation(tmp_path, sites) as (superlink, certs):
        root = remote_workspace(
            tmp_path,
            (server_x, server_y),
            superlink,
            certs,
            {
                "pretrain": {"epochs": 2, "batch_size": 128},
                "federate": {"rounds": 2, "local_epochs": 1},
                "federation": {"site_wait_seconds": 120},
            },
        )
        run_server_stages(root)

    # partition wrote no client shard; federate reports each site
    assert not list((root / "data/partitions/clients").glob("*.parquet"))
    reported = json.loads((root / "models/federate/sites.json").read_text())
    assert [s["site"] for s in reported] == list(SITES)
    for entry, name in zip(reported, SITES, strict=True):
        prepared = json.loads((tmp_path / "sites" / name / "prepared" / "site.json").read_text())
        assert entry["rows"] == prepared["rows"] and entry["holdout_rows"] > 0
        assert 0.0 <= entry["holdout_accuracy"] <= 1.0

    # the same rows in process: within a point of the remote run
    metrics = json.loads((root / "reports/federate.json").read_text())
    assert metrics["clients"] == len(SITES) and metrics["rounds"] == 2
    simulated = simulate_same_rows(root, tmp_path / "sites")
    assert abs(metrics["val_accuracy"] - simulated) <= 0.01

    # per-site metrics in MLflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("lepton").experiment_id],
        filter_string="tags.lepton.stage = 'federate'",
    )
    assert runs, "no federate run in MLflow"
    logged = runs[0].data.metrics
    for name in SITES:
        assert f"site.{name}.holdout_accuracy" in logged and f"site.{name}.rows" in logged
        # each site's training loss, round by round, as the run went
        history = MlflowClient(tracking_uri=uri).get_metric_history(
            runs[0].info.run_id, f"site.{name}.round_train_loss"
        )
        assert sorted(m.step for m in history) == [1, 2]

    # no site row in any output of the workspace or of MLflow
    server = row_digests(server_x)
    site_digests = set().union(*(row_digests(x) for x, _ in sites.values())) - server
    raw_rows = [
        r.reshape(-1).tobytes()
        for x, _ in sites.values()
        for r in x.astype(np.float32)
        if hashlib.sha256(r.reshape(-1).tobytes()).hexdigest() in site_digests
    ]
    leaks = []
    for folder in ("data", "models", "reports", "mlartifacts", ".lepton"):
        if (root / folder).exists():
            leaks += site_rows_in(root / folder, site_digests, raw_rows)
    assert not leaks, leaks


def simulate_same_rows(
    root: Path, sites_folder: Path, federate_overrides: dict | None = None
) -> float:
    """The in-process federation over the sites' prepared rows (scaled as the run scaled
    them), from the same encoder, seeds and params (``federate_overrides`` on top): its
    final val accuracy."""
    from pipelines.config import load_params
    from pipelines.federated.sites import load_site
    from pipelines.io import Paths, read_image_table, read_json
    from pipelines.models.encoder import load_encoder
    from pipelines.stages.federate import federate

    paths = Paths(root)
    params = load_params(root / "params.yaml")
    scale = read_json(paths.partitions / "manifest.json")["normalization"]
    clients = []
    for name in SITES:
        prepared = sites_folder / name / "prepared"
        node = {"site": name, "data": str(prepared / "train.parquet"), "scale": "raw"}
        clients.append(load_site(node, scale).train)
    _, history = federate(
        load_encoder(paths.model_dir("pretrain")),
        clients,
        read_image_table(paths.partitions / "val.parquet"),
        params.federate.model_copy(update=federate_overrides or {}),
        params.common.seed,
        "cpu",
    )
    return history[-1]["val_accuracy"]


def test_an_unreachable_superlink_fails_fast_and_keeps_the_outputs(tmp_path: Path):
    """federate against an address where nobody listens: a clear error naming the address,
    within the connect timeout, and the previous outputs untouched."""
    from pipelines.config import CommonParams, FederateParams, FederationParams, Params
    from pipelines.errors import LeptonError
    from pipelines.federated.flower_deploy import free_port
    from pipelines.stages import federate
    from tests.conftest import make_federation_workspace
    from tests.e2e.test_flower import Tracker

    paths = make_federation_workspace(tmp_path / "ws")
    out = paths.model_dir("federate")
    out.mkdir(parents=True)
    (out / "model.json").write_text("previous")
    address = f"127.0.0.1:{free_port()}"
    params = Params(
        common=CommonParams(seed=0, device="cpu"),
        federate=FederateParams(runtime="flower", rounds=1),
        federation=FederationParams(superlink=address, insecure=True, connect_timeout_seconds=10),
    )
    started = time.monotonic()
    with pytest.raises(LeptonError, match=address.replace(".", r"\.")):
        federate.run(params, paths, Tracker())
    assert time.monotonic() - started < 60
    assert (out / "model.json").read_text() == "previous"
    assert not paths.report("federate").exists()
    assert os.listdir(out) == ["model.json"]


def test_record_level_dp_at_remote_sites_releases_only_noisy_counts_heads_and_epsilon(
    tmp_path: Path,
):
    """Record-level DP with the sites' rows at the sites: each site accounts for itself
    (its own noise, its accountant in its ClientApp state), the run reports their ε, and no
    true row count or held-out score leaves a site."""
    sites, server = digits_split()
    with running_federation(tmp_path, sites) as (superlink, certs):
        root = remote_workspace(
            tmp_path,
            server,
            superlink,
            certs,
            {
                "pretrain": {"method": "scattering", "scattering_scales": 1},
                "federate": {
                    "rounds": 10,
                    "local_epochs": 1,
                    "learning_rate": 1.0,
                    "dp": {"enabled": True, "unit": "record", "target_epsilon": 3.0},
                },
                "federation": {"site_wait_seconds": 120},
            },
        )
        run_server_stages(root)

    metrics = json.loads((root / "reports/federate.json").read_text())
    assert metrics["dp_unit"] == "record" and 2.9 < metrics["epsilon"] <= 3.0
    assert metrics["val_accuracy"] > 0.5  # 10 noisy rounds, far above chance (0.1)
    reported = json.loads((root / "models/federate/sites.json").read_text())
    assert [s["site"] for s in reported] == list(SITES)
    for entry, name in zip(reported, SITES, strict=True):
        prepared = json.loads((tmp_path / "sites" / name / "prepared" / "site.json").read_text())
        assert entry["rows"] is None and "holdout_accuracy" not in entry
        assert entry["rows_released"] != prepared["rows"]  # noised (a tie has odds ~0)
        assert entry["epsilon"] == pytest.approx(metrics["epsilon"])  # in every round

    from mlflow import MlflowClient

    from pipelines.federated.privacy import client_epsilon_key
    from pipelines.stages.federate import remote_data_key

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("lepton").experiment_id],
        filter_string="tags.lepton.stage = 'federate'",
    )
    logged = runs[0].data.metrics
    assert logged[client_epsilon_key(remote_data_key(superlink))] == pytest.approx(
        metrics["epsilon"]
    )
    assert not [k for k in logged if k.endswith((".rows", ".holdout_accuracy"))]
