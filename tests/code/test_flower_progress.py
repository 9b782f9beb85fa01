"""The Flower runtime's transport: the run spec packaged into the app, and the ServerApp's
progress and result lines read back out of `flwr log` while the run goes."""

from __future__ import annotations

import json

import pytest


def test_run_log_hands_each_progress_row_over_once_and_keeps_the_result():
    """The stage polls the whole log so far: every progress row once, a line cut short
    only when it is complete, and the result line when it has arrived."""
    from pipelines.federated.flower_deploy import PROGRESS_MARK, RESULT_MARK, RunLog

    seen = []
    follow = RunLog(seen.append)
    follow.feed("")
    first = f"INFO : starting\n{PROGRESS_MARK}{json.dumps({'round': 1})}\n"
    follow.feed(first + PROGRESS_MARK + '{"round": ')
    assert seen == [{"round": 1}] and follow.result is None
    done = (
        first + f"{PROGRESS_MARK}{json.dumps({'round': 2})}\n{RESULT_MARK}{json.dumps({'ok': 1})}\n"
    )
    follow.feed(done)
    follow.feed(done)
    assert seen == [{"round": 1}, {"round": 2}] and follow.seen == 2
    assert follow.result == {"ok": 1}


def test_the_run_spec_travels_inside_the_app_bundle(tmp_path):
    """package_app puts the spec and its blobs next to the app's code (a FAB carries .json
    files), and the ServerApp's side reads back the same bytes."""
    from pipelines.federated.flower_deploy import APP_DIR, package_app, read_run_spec

    blobs = {"initial": bytes(range(256)) * 3, "val": b"PAR1"}
    app = package_app(APP_DIR, tmp_path, {"seed": 7}, blobs)
    assert (app / "pyproject.toml").exists()
    spec, back = read_run_spec(app / "lepton_flower")
    assert spec == {"seed": 7} and back == blobs


def test_a_run_spec_over_the_bundle_limit_is_refused_with_its_size(tmp_path):
    from pipelines.federated.flower_deploy import (
        APP_DIR,
        FAB_MAX_BYTES,
        FlowerRuntimeError,
        package_app,
    )

    with pytest.raises(FlowerRuntimeError, match="val 11.0 MB"):
        package_app(APP_DIR, tmp_path, {}, {"val": b"x" * int(11e6)})
    assert FAB_MAX_BYTES == 10 * 1024 * 1024
