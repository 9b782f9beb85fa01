"""params.yaml validation: unknown keys and out-of-range values fail naming the key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipelines.config import apply_overrides, load_params, parse_override
from pipelines.errors import ConfigError
from tests.conftest import BIN, REPO, workspace_env


def test_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.partition.num_clients == 5
    assert params.partition.alpha == 0.5


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("partition.alpah=0.3", "partition.alpah"),
        ("federate.rounds=0", "federate.rounds"),
        ("partition.test_fraction=1.5", "partition.test_fraction"),
        ("runtime.executor=kubernetes", "runtime.executor"),
        ("colour.hue=1", "colour"),
    ],
)
def test_bad_params_name_the_key(override, key):
    with pytest.raises(ConfigError) as caught:
        load_params(REPO / "params.yaml", [override])
    assert key in str(caught.value)
    assert "params.yaml" in str(caught.value)


def test_more_qubits_than_embedding_dimensions_is_refused():
    with pytest.raises(ConfigError, match="quantum.n_qubits .6. must not exceed"):
        load_params(REPO / "params.yaml", ["pretrain.embedding_dim=5", "quantum.n_qubits=6"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("federate.aggregator=median", "federate.aggregator 'mean'"),
        ("federate.max_update_norm=5", "no federate.max_update_norm"),
        ("federate.dp.enabled=true", "federate.dp.enabled false"),
        ("federate.runtime=simulation", "federate.runtime 'flower'"),
    ],
)
def test_secure_aggregation_refuses_what_needs_each_update(override, named):
    """SecAgg+ shows the server only the mean: every setting that needs no more holds
    (FedAdam, server learning rate, sampling, timeouts); one that needs each update is
    refused, named."""
    secure = ["federate.runtime=flower", "federate.secure_aggregation=true"]
    honoured = [
        "federate.strategy=fedadam",
        "federate.server_learning_rate=0.01",
        "federate.client_fraction=0.6",
        "federate.min_clients=2",
        "federate.client_timeout_seconds=30",
    ]
    load_params(REPO / "params.yaml", [*secure, *honoured])
    with pytest.raises(ConfigError, match="federate.secure_aggregation needs") as caught:
        load_params(REPO / "params.yaml", [*secure, override])
    assert named in str(caught.value)


def test_source_without_path_is_refused():
    with pytest.raises(ConfigError, match="ingest.path is required"):
        load_params(REPO / "params.yaml", ["ingest.source=csv"])


def test_override_parsing_uses_yaml_types():
    assert parse_override("federate.rounds=7") == (["federate", "rounds"], 7)
    assert parse_override("ingest.image_shape=[8, 8]") == (["ingest", "image_shape"], [8, 8])
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")
    merged = apply_overrides({"federate": {"rounds": 3}}, ["federate.rounds=4"])
    assert merged["federate"]["rounds"] == 4


def test_params_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ValidationError):
        params.federate.rounds = 99  # type: ignore[misc]


def _write_params(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.parametrize(("key", "value"), [("sourse", "digits"), ("num_classes", 1)])
def test_stage_command_exits_non_zero_and_writes_nothing(workspace: Path, key, value):
    _write_params(workspace, "ingest", key, value)
    done = subprocess.run(
        [str(BIN / "lepton"), "stage", "run", "ingest"],
        cwd=workspace,
        env=workspace_env(workspace),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert f"ingest.{key}" in done.stderr
    assert not (workspace / "data" / "raw").exists()
    assert not (workspace / "reports").exists()


def test_lepton_run_refuses_bad_override_before_running(workspace: Path):
    done = subprocess.run(
        [str(BIN / "lepton"), "run", "--set", "federate.rounds=-2"],
        cwd=workspace,
        env=workspace_env(workspace),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "federate.rounds" in done.stderr
    assert "rounds: 36 " in (workspace / "params.yaml").read_text()  # untouched


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["quantum.foo=1"], "quantum.foo"),  # unknown key
        (["nosuchsection.key=1"], "nosuchsection"),  # unknown section
        (["federate.rounds=0"], "federate.rounds"),  # out of range
        (["federate.rounds=12", "partition.alpha=-1"], "partition.alpha"),  # one bad of two
        (["common.seed.deeper=1"], "'seed' is not a section"),
        (["quantum.n_qubits=20", "pretrain.embedding_dim=8"], "quantum.n_qubits"),  # cross-field
        (["federate.rounds"], "expected section.key=value"),
    ],
)
def test_bad_set_leaves_params_yaml_byte_identical(workspace: Path, overrides, named):
    from typer.testing import CliRunner

    from pipelines.cli import app

    before = (workspace / "params.yaml").read_bytes()
    argv = ["run"] + [arg for o in overrides for arg in ("--set", o)]
    result = CliRunner().invoke(app, argv, env={"LEPTON_WORKSPACE": str(workspace)})
    assert result.exit_code != 0
    assert named in result.output
    assert (workspace / "params.yaml").read_bytes() == before


def test_good_set_keeps_comments_and_writes_what_load_params_reads(workspace: Path):
    from pipelines.config import write_overrides

    write_overrides(workspace / "params.yaml", ["federate.rounds=7", "ingest.image_shape=[8, 8]"])
    text = (workspace / "params.yaml").read_text()
    assert text.startswith((REPO / "params.yaml").read_text().splitlines()[0])  # header comment
    params = load_params(workspace / "params.yaml")
    assert params.federate.rounds == 7 and params.ingest.image_shape == (8, 8)
    assert not list(workspace.glob(".params.yaml.*.tmp"))
