"""The privacy ledger across federate runs, and failures that keep the previous model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipelines.config import (
    CommonParams,
    DPParams,
    FederateParams,
    Params,
    PrivacyParams,
    RegisterParams,
)
from pipelines.federated.fedavg import FederationError
from pipelines.federated.privacy import PrivacyBudgetError
from pipelines.io import Paths, read_json
from pipelines.stages import federate
from pipelines.stages.register import evaluate_gates
from pipelines.tracking import client, stage_run
from tests.conftest import make_federation_workspace

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """Three digits clients, val, and an untrained pretrain encoder, with its own MLflow."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LEPTON_PIPELINE_RUN", "test-ledger")
    make_federation_workspace(tmp_path)
    return tmp_path


def params(max_epsilon: float | None, **federate_overrides) -> Params:
    dp = DPParams(enabled=True, clip_norm=1.0, noise_multiplier=1.0)
    base = {"rounds": 1, "local_epochs": 1, "batch_size": 64, "dp": dp}
    return Params(
        common=CommonParams(seed=0, device="cpu"),
        federate=FederateParams(**{**base, **federate_overrides}),
        privacy=PrivacyParams(max_epsilon=max_epsilon),
    )


def run_federate(root: Path, p: Params):
    with stage_run("federate", root, "lepton") as tracker:
        return tracker, federate.run(p, Paths(root), tracker)


def snapshot(root: Path) -> dict[str, bytes]:
    files = [*sorted((root / "models" / "federate").rglob("*")), root / "reports/federate.json"]
    return {str(f): f.read_bytes() for f in files if f.is_file()}


def test_ledger_accumulates_and_refuses_a_run_past_the_budget(workspace: Path):
    _, first = run_federate(workspace, params(max_epsilon=10.0))
    assert first["dp"] == 1 and 0 < first["epsilon"] < 10.0
    assert first["ledger_epsilon_total"] == pytest.approx(first["epsilon"])
    budget = 1.5 * first["epsilon"]  # room for the first run, not for a second one
    before = snapshot(workspace)

    tracker = None
    with pytest.raises(PrivacyBudgetError, match="privacy budget exceeded") as caught:
        with stage_run("federate", workspace, "lepton") as tracker:
            federate.run(params(max_epsilon=budget), Paths(workspace), tracker)
    assert f"> privacy.max_epsilon {budget:g}" in str(caught.value)
    assert snapshot(workspace) == before
    assert client(workspace).get_run(tracker.run_id).info.status == "FAILED"

    # with a budget for two runs it goes on, and the ledger holds both
    _, second = run_federate(workspace, params(max_epsilon=2.5 * first["epsilon"]))
    assert second["ledger_epsilon_total"] == pytest.approx(2 * first["epsilon"])


class Interrupted(Exception):
    """Stands in for a kill of the stage after a round was logged."""


def test_an_interrupted_run_counts_until_a_later_run_resumes_it(workspace: Path):
    """A run that dies after round 2 of 3 released two rounds: the ledger counts its last
    round_epsilon. The rerun resumes from its checkpoint, so its ε includes them: it tags
    the dead run carried_by itself and the ledger then holds one run's ε, not two."""
    from pipelines.federated.privacy import CARRIED_TAG, DATA_TAG, spent_epsilon

    p = params(max_epsilon=None, rounds=3)
    with pytest.raises(Interrupted):
        with stage_run("federate", workspace, "lepton") as dead:
            log_metrics = dead.log_metrics

            def die_after_round_2(metrics, step=None):
                log_metrics(metrics, step=step)
                if step == 2:
                    raise Interrupted

            dead.log_metrics = die_after_round_2
            federate.run(p, Paths(workspace), dead)
    mlflow = client(workspace)
    run = mlflow.get_run(dead.run_id)
    assert run.info.status == "FAILED"
    data = run.data.tags[DATA_TAG]
    experiment = [run.info.experiment_id]
    released = run.data.metrics["round_epsilon"]
    assert 0 < released == pytest.approx(spent_epsilon(mlflow, experiment, data))

    tracker, metrics = run_federate(workspace, p)
    assert metrics["rounds"] == 3 and metrics["epsilon"] > released
    assert mlflow.get_run(dead.run_id).data.tags[CARRIED_TAG] == tracker.run_id
    assert spent_epsilon(mlflow, experiment, data) == pytest.approx(metrics["epsilon"])
    assert metrics["ledger_epsilon_total"] == pytest.approx(metrics["epsilon"])


def test_a_budget_refuses_a_run_without_dp(workspace: Path):
    no_dp = params(max_epsilon=8.0, dp=DPParams(enabled=False))
    with pytest.raises(PrivacyBudgetError, match="dp is off"):
        run_federate(workspace, no_dp)
    assert not (workspace / "models" / "federate").exists()


def test_a_failed_federation_keeps_the_previous_model(workspace: Path):
    run_federate(workspace, params(max_epsilon=None))
    before = snapshot(workspace)
    with pytest.raises(FederationError, match="3 acceptable client updates, 4 needed"):
        run_federate(workspace, params(max_epsilon=None, min_clients=4))
    assert snapshot(workspace) == before
    assert read_json(workspace / "reports" / "federate.json")["rounds"] == 1


def test_register_refuses_to_promote_past_the_privacy_budget():
    p = RegisterParams(accuracy_floor=0.5)
    assert evaluate_gates(0.9, None, p, epsilon=3.0, max_epsilon=8.0)["privacy_budget"]
    assert not evaluate_gates(0.9, None, p, epsilon=9.0, max_epsilon=8.0)["privacy_budget"]
    assert not evaluate_gates(0.9, None, p, epsilon=math.inf, max_epsilon=8.0)["privacy_budget"]
    assert evaluate_gates(0.9, None, p)["privacy_budget"]  # no budget set
