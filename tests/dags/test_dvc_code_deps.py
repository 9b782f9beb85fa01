"""`dvc status` after editing a shared module lists the stages that import it, and only those."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipelines.registry import SOURCE_FINGERPRINT, SOURCE_PROBE, STAGE_NAMES, STAGES
from tests.conftest import BIN, make_workspace, workspace_env


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dvc"), *args],
        cwd=root,
        env=workspace_env(root),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def locked_workspace(tmp_path_factory) -> Path:
    """A workspace whose dvc.lock records every stage as done (placeholder outputs)."""
    root = make_workspace(tmp_path_factory.mktemp("codedeps") / "ws")
    placeholders = [SOURCE_FINGERPRINT]
    for stage in STAGES:
        placeholders += [*stage.metrics, *stage.deps]
        for out in stage.outs:
            (root / out).mkdir(parents=True, exist_ok=True)
            (root / out / "placeholder").write_text(stage.name)
    for path in placeholders:
        if not (root / path).exists():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text("{}\n")
    done = dvc(root, "commit", "--force", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def changed_stages(root: Path, edited: str) -> set[str]:
    """Stages `dvc status` reports after appending a comment to ``edited``."""
    path = root / edited
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        done = dvc(root, "status", "--json")
    finally:
        path.write_text(original)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout)) - {SOURCE_PROBE}


def test_nothing_changed_before_an_edit(locked_workspace: Path):
    done = dvc(locked_workspace, "status", "--json")
    assert json.loads(done.stdout) == {SOURCE_PROBE: ["always changed"]}


@pytest.mark.parametrize(
    ("edited", "stages"),
    [
        ("pipelines/io.py", set(STAGE_NAMES)),
        ("pipelines/data/sources.py", {"ingest"}),
        ("pipelines/quantum/statevector.py", {"quantum", "evaluate", "register"}),
        ("pipelines/quantum/pyfunc_model.py", {"register"}),
        # the round loop is shared with federated pretraining (pipelines/federated/ssl.py)
        ("pipelines/federated/strategies.py", {"pretrain", "federate"}),
        ("pipelines/registry.py", set()),
        ("pipelines/cli.py", set()),
    ],
)
def test_an_edited_module_marks_exactly_the_stages_that_import_it(
    locked_workspace: Path, edited, stages
):
    assert changed_stages(locked_workspace, edited) == stages
