"""MLflow under load: writers side by side on one SQLite store, and an authenticated server.

- Six processes open a *fresh* SQLite store at once and each logs a stage run. Without the
  lock in :func:`pipelines.tracking.client`, MLflow's table creation races and every one of
  them fails (``table _alembic_tmp_runs already exists``); with it all six finish and each
  run holds exactly its own metrics.
- ``mlflow server --app-name basic-auth`` (what docker/compose.yaml runs): a request without
  credentials is refused, a stage run with ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` logs
  its metrics and its artifact into the server's artifact store, not into the workspace.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import wait_for_http

pytestmark = pytest.mark.slow

WRITERS = 6
STEPS = 20


def _log_one_stage(index: int, root: str, barrier) -> str | None:
    """One writer: its own pipeline run key, one stage run, STEPS metric steps."""
    os.environ["LEPTON_PIPELINE_RUN"] = f"writer-{index}"
    from pipelines import tracking

    barrier.wait()  # all open the fresh store at the same moment
    try:
        with tracking.stage_run("stage", Path(root), "lepton") as tracker:
            for step in range(STEPS):
                tracker.log_metrics({"value": index * 1000 + step}, step=step)
            tracker.log_params({"writer": {"index": index}})
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"writer {index}: {type(exc).__name__}: {exc}"
    return None


def test_writers_side_by_side_on_a_fresh_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(WRITERS)
        with context.Pool(WRITERS) as pool:
            failures = pool.starmap(
                _log_one_stage, [(i, str(tmp_path), barrier) for i in range(WRITERS)]
            )
    assert [f for f in failures if f] == []

    from pipelines import tracking

    mlflow_client = tracking.client(tmp_path)
    exp = mlflow_client.get_experiment_by_name("lepton")
    stages = mlflow_client.search_runs([exp.experiment_id], "tags.`lepton.kind` = 'stage'")
    assert len(stages) == WRITERS
    for run in stages:
        index = int(run.data.params["writer.index"])
        assert run.data.tags[tracking.PIPELINE_TAG] == f"writer-{index}"
        history = mlflow_client.get_metric_history(run.info.run_id, "value")
        assert sorted(m.value for m in history) == [index * 1000 + s for s in range(STEPS)]
        assert run.info.status == "FINISHED"


ADMIN_PASSWORD = "lepton-test-admin-password"


@pytest.fixture
def auth_server(tmp_path):
    """``mlflow server --app-name basic-auth`` on a free loopback port; yields its URL."""
    from pipelines.federated.flower_deploy import free_port

    config = tmp_path / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "lepton-test-secret-key",
    }
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    ]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", server, (tmp_path / "server.log").read_text)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_authenticated_tracking_server(auth_server, tmp_path, monkeypatch):
    search = f"{auth_server}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401

    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "report.txt").write_text("stage report\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server)
    monkeypatch.setenv("LEPTON_PIPELINE_RUN", "authenticated-run")

    from mlflow.exceptions import MlflowException

    from pipelines import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(MlflowException, match="401"):
        with tracking.stage_run("ingest", workspace, "lepton"):
            pass

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    with tracking.stage_run("ingest", workspace, "lepton") as tracker:
        tracker.log_metrics({"rows": 1797})
        tracker.log_artifact(workspace / "report.txt")
    mlflow_client = tracking.client(workspace)
    exp = mlflow_client.get_experiment_by_name("lepton")
    (run,) = mlflow_client.search_runs([exp.experiment_id], "tags.`lepton.kind` = 'stage'")
    assert run.data.metrics == {"rows": 1797.0}
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list((tmp_path / "server-artifacts").rglob("report.txt"))
    assert [p.read_text() for p in stored] == ["stage report\n"]
    assert not (workspace / "mlartifacts").exists()
