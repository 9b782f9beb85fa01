"""The DAG task command: when it trusts the run's fresh snapshot and when it asks DVC.

A stand-in ``dvc`` script records each call and answers ``dvc status --json`` with a fixed
status, so these tests see which DVC commands a task starts. The real DVC path is covered by
the nightly e2e test and ``benchmarks/nightly.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.registry import SOURCE_PROBE, STAGE_NAMES
from pipelines.stage_task import fresh_stages, read_snapshot, run_task, snapshot_path

KEY = "run-test:01+00"


@pytest.fixture
def fake_dvc(tmp_path: Path):
    """A dvc executable that logs its argv; ``status`` prints ``status.json``."""
    calls = tmp_path / "calls.txt"
    status = tmp_path / "status.json"
    status.write_text("{}")
    script = tmp_path / "dvc"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        f'if [ "$1" = status ]; then cat {status}; fi\n'
        'if [ "$FAKE_DVC_FAIL" = "$*" ]; then exit 3; fi\n'
    )
    script.chmod(0o755)

    def called() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    return str(script), status, called


def test_fresh_stages_are_those_dvc_status_does_not_list():
    status = {SOURCE_PROBE: ["always changed"], "dvc.yaml:quantum": [{"changed deps": {}}]}
    fresh = fresh_stages(status)
    assert "quantum" not in fresh and "ingest" in fresh and "register" in fresh
    assert fresh_stages({}) == list(STAGE_NAMES)


def test_unchanged_run_starts_dvc_only_in_the_first_task(tmp_path, fake_dvc):
    dvc, _, called = fake_dvc
    for name in STAGE_NAMES:
        assert run_task(name, tmp_path, KEY, 1, dvc) == 0
    assert called() == [f"repro --single-item {SOURCE_PROBE} ingest", "status --json"]
    assert not snapshot_path(tmp_path, KEY).exists(), "the last task deletes the snapshot"


def test_a_stage_that_runs_voids_the_snapshot_for_every_later_task(tmp_path, fake_dvc):
    dvc, status, called = fake_dvc
    status.write_text(json.dumps({"pretrain": [{"changed deps": {"params.yaml": "modified"}}]}))
    for name in STAGE_NAMES:
        assert run_task(name, tmp_path, KEY, 1, dvc) == 0
    later = STAGE_NAMES[STAGE_NAMES.index("pretrain") :]
    assert called() == [
        f"repro --single-item {SOURCE_PROBE} ingest",
        "status --json",
        *[f"repro --single-item {name}" for name in later],
    ]


def test_a_retried_task_asks_dvc_even_with_a_snapshot(tmp_path, fake_dvc):
    dvc, _, called = fake_dvc
    run_task("ingest", tmp_path, KEY, 1, dvc)
    assert "compress" in read_snapshot(tmp_path, KEY)
    assert run_task("compress", tmp_path, KEY, 2, dvc) == 0
    assert called()[-1] == "repro --single-item compress"


def test_without_a_run_key_every_task_asks_dvc(tmp_path, fake_dvc):
    dvc, _, called = fake_dvc
    run_task("ingest", tmp_path, "", 1, dvc)
    run_task("compress", tmp_path, "", 1, dvc)
    assert called() == [
        f"repro --single-item {SOURCE_PROBE} ingest",
        "repro --single-item compress",
    ]


def test_a_failed_ingest_writes_no_snapshot_and_keeps_its_exit_code(
    tmp_path, fake_dvc, monkeypatch
):
    dvc, _, called = fake_dvc
    monkeypatch.setenv("FAKE_DVC_FAIL", f"repro --single-item {SOURCE_PROBE} ingest")
    assert run_task("ingest", tmp_path, KEY, 1, dvc) == 3
    assert not snapshot_path(tmp_path, KEY).exists()
    assert called() == [f"repro --single-item {SOURCE_PROBE} ingest"]


def test_unreadable_dvc_status_means_no_snapshot(tmp_path, fake_dvc):
    dvc, status, called = fake_dvc
    status.write_text("not json")
    assert run_task("ingest", tmp_path, KEY, 1, dvc) == 0
    assert read_snapshot(tmp_path, KEY) == set()
    run_task("compress", tmp_path, KEY, 1, dvc)
    assert called()[-1] == "repro --single-item compress"


def test_unknown_stage_is_refused(tmp_path, fake_dvc):
    from pipelines.stage_task import main

    assert main(["no_such_stage"]) == 2
