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
