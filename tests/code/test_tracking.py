"""The workspace's MLflow experiment opens as a model-training experiment in MLflow 3's UI."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    client,
    experiment_id,
)


@pytest.fixture
def mlflow_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client(tmp_path)


def test_a_new_experiment_is_marked_as_model_training(mlflow_client, tmp_path: Path) -> None:
    exp = mlflow_client.get_experiment(experiment_id(mlflow_client, "lepton", tmp_path))
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_an_old_experiment_gets_the_mark_and_a_chosen_kind_stays(
    mlflow_client, tmp_path: Path
) -> None:
    old = mlflow_client.create_experiment("old")  # made before the mark existed
    assert EXPERIMENT_KIND_TAG not in mlflow_client.get_experiment(old).tags
    assert experiment_id(mlflow_client, "old", tmp_path) == old
    assert mlflow_client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    chosen = mlflow_client.create_experiment(
        "chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"}
    )
    experiment_id(mlflow_client, "chosen", tmp_path)
    assert mlflow_client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
