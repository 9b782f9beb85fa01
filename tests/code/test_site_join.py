"""A site's side of a federation: `lepton site join` prepares the site's own data with
ingest's validation, the SuperNode command it starts, certificates and keys."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import IngestParams
from tests.conftest import BIN


def write_site_npz(path: Path, rows: int = 60) -> None:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 17, (rows, 8, 8)).astype(np.float32), y=np.arange(rows) % 10)


def test_prepare_site_keeps_rows_back_per_class_and_records_them(tmp_path: Path):
    from pipelines.federated.site import SiteFiles, prepare_site
    from pipelines.io import read_image_table

    write_site_npz(tmp_path / "site.npz")
    ingest = IngestParams(source="npz", path=str(tmp_path / "site.npz"))
    manifest = prepare_site(ingest, "a", tmp_path / "prepared", holdout_fraction=0.2, seed=1)
    files = SiteFiles(tmp_path / "prepared")
    train, holdout = read_image_table(files.train), read_image_table(files.holdout)
    assert len(train.labels) + len(holdout.labels) == 60
    assert np.bincount(holdout.labels, minlength=10).tolist() == [1] * 10
    assert float(train.images.max()) > 1.0  # the source's own scale: the run scales it
    assert json.loads(files.manifest.read_text()) == manifest
    assert manifest["rows"] == len(train.labels) and manifest["classes_present"] == list(range(10))


def test_a_bad_site_file_is_refused_before_anything_starts(tmp_path: Path):
    """The same errors as ingest (file, field, row), exit code non-zero, nothing written and
    no SuperNode started."""
    x = np.zeros((6, 8, 8), np.float32)
    x[4, 2, 3] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(6))
    done = subprocess.run(
        [
            str(BIN / "lepton"), "site", "join", "--superlink", "127.0.0.1:1", "--name", "a",
            "--source", "npz", "--path", str(tmp_path / "bad.npz"), "--insecure",
            "--work-dir", str(tmp_path / "prepared"),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "bad.npz" in done.stderr and "row 4" in done.stderr and "field 'x'" in done.stderr
    assert not (tmp_path / "prepared").exists()


def test_supernode_command_names_the_sites_files_and_its_trust(tmp_path: Path):
    from pipelines.errors import ConfigError
    from pipelines.federated.site import SiteFiles, site_node_config, supernode_argv, worker_socket

    files = SiteFiles(tmp_path / "prepared")
    node = {**site_node_config("a", files), "worker": str(worker_socket(files))}
    (tmp_path / "ca.crt").write_text("pem")
    argv = supernode_argv(Path("/bin"), "link:8000", node, tmp_path / "ca.crt", port=9101)
    runtime = ["/bin/python", "-m", "pipelines.federated.flower_site_runtime", "supernode"]
    assert argv[:4] == runtime and argv[4:7] == ["--poll-seconds", "0.5", "--"]
    assert argv[7:9] == ["--superlink", "link:8000"]
    stock = supernode_argv(Path("/bin"), "link:8000", node, tmp_path / "ca.crt", poll_seconds=None)
    assert stock[:3] == ["/bin/flower-supernode", "--superlink", "link:8000"]
    assert argv[argv.index("--root-certificates") + 1] == str((tmp_path / "ca.crt").resolve())
    config = argv[argv.index("--node-config") + 1]
    assert 'site="a"' in config and 'scale="raw"' in config and str(files.train) in config
    assert f'worker="{files.folder.resolve()}/worker.sock"' in config
    deep = SiteFiles(tmp_path / ("x" * 120))  # a Unix socket path must stay short
    assert len(str(worker_socket(deep))) < 100
    with pytest.raises(ConfigError, match="not both or neither"):
        supernode_argv(Path("/bin"), "link:8000", node)
    with pytest.raises(ConfigError, match="needs TLS"):
        supernode_argv(Path("/bin"), "l:1", node, insecure=True, auth_private_key=files.train)
    with pytest.raises(ConfigError, match="no such file"):
        supernode_argv(Path("/bin"), "l:1", node, tmp_path / "missing.crt")


def test_a_site_worker_answers_as_the_clientapp_would(tmp_path: Path):
    """The warm worker runs the same site step as an in-process ClientApp: the same
    answer to a query, and an error (a refused file) comes back with its message."""
    from pipelines.federated.flower_deploy import start_site_worker, stop_processes
    from pipelines.federated.site import SiteFiles, prepare_site, site_node_config
    from pipelines.federated.site_steps import run_step
    from pipelines.federated.site_worker import call
    from pipelines.federated.sites import load_site

    write_site_npz(tmp_path / "site.npz")
    files = SiteFiles(tmp_path / "prepared")
    prepare_site(IngestParams(source="npz", path=str(tmp_path / "site.npz")), "a", files.folder)
    node = site_node_config("a", files)
    config = {
        "normalization": json.dumps({"low": 0.0, "high": 16.0}),
        "expected": json.dumps({"channels": 1, "image_shape": [8, 8], "num_classes": 10}),
    }
    socket_path = tmp_path / "w.sock"
    worker = start_site_worker(BIN / "python", socket_path, node, tmp_path / "worker.log")
    try:
        info, metrics, arrays = call(socket_path, "query", config, {})
        local = run_step("query", load_site(node, {"low": 0.0, "high": 16.0}), config, {})
        assert (info, metrics, arrays) == local and info["site"] == "a"
        wrong = {**config, "expected": json.dumps({"channels": 3, "image_shape": [8, 8],
                                                   "num_classes": 10})}  # fmt: skip
        with pytest.raises(RuntimeError, match="train.parquet.*3"):
            call(socket_path, "query", wrong, {})
    finally:
        stop_processes([worker])


def test_certificates_are_signed_by_the_ca_for_the_hosts_given(tmp_path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    from pipelines.federated.certificates import make_certificates, make_supernode_key

    files = make_certificates(tmp_path, ["link.example.org"])
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    cert = x509.load_pem_x509_certificate(files.certificate.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert files.key.stat().st_mode & 0o077 == 0
    private, public = make_supernode_key(tmp_path / "node")
    assert load_ssh_public_key(public.read_bytes()).curve.name == "secp384r1"
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


def test_remote_params_need_tls_or_insecure_and_flower():
    from pipelines.config import FederationParams, validate_params
    from pipelines.errors import ConfigError

    with pytest.raises(ValueError, match="root_certificates"):
        FederationParams(superlink="link:8000")
    with pytest.raises(ValueError, match="exclude each other"):
        FederationParams(superlink="link:8000", root_certificates="ca.crt", insecure=True)
    with pytest.raises(ConfigError, match="federate.runtime 'flower'"):
        validate_params({"federation": {"superlink": "link:8000", "insecure": True}})
    with pytest.raises(ConfigError, match="superlink"):
        validate_params({"federation": {"superlink": "no port"}})
    remote = {"superlink": "link:8000", "insecure": True}
    params = validate_params({"federation": remote, "federate": {"runtime": "flower"}})
    assert params.federation.remote and not FederationParams().remote
    assert params.encoder_rows() == "server-held rows"  # SimCLR on the workspace's rows
    with pytest.raises(ConfigError, match="public_fraction .* server-held already"):
        validate_params(
            {
                "federation": remote,
                "federate": {"runtime": "flower"},
                "partition": {"public_fraction": 0.2},
            }
        )


def test_the_supernode_image_joins_with_the_flower_environments_lepton():
    """docker/Dockerfile.supernode installs the Flower lock and this project, and its entry
    point is `lepton site join` with the Flower executables on LEPTON_FLOWER_BIN: the same
    command works in the Flower environment here."""
    from pipelines.federated.flower_deploy import flower_bin

    dockerfile = (Path(__file__).parents[2] / "docker" / "Dockerfile.supernode").read_text()
    assert 'ENTRYPOINT ["lepton", "site", "join"]' in dockerfile
    assert "LEPTON_FLOWER_BIN=/usr/local/bin" in dockerfile
    assert "requirements-flower.lock" in dockerfile
    if not (flower_bin() / "lepton").exists():
        pytest.skip("the Flower environment is missing: run `make flower-setup`")
    done = subprocess.run(
        [str(flower_bin() / "lepton"), "site", "join", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--superlink" in done.stdout
