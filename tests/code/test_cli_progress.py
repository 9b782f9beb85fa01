"""What `lepton run` shows in the terminal of a pipeline run's log."""

from __future__ import annotations

import pytest

from pipelines.cli import progress_line

AIRFLOW = (
    "2026-11-23T18:44:13.842791Z [info     ] {} "
    "[airflow.task.hooks.airflow.providers.standard.hooks.subprocess.SubprocessHook] "
    "loc=subprocess.py:106\n"
)


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (
            AIRFLOW.format("18:44:15 INFO lepton: [lepton] stage pretrain done in 24.1 s: x=1"),
            "[lepton] stage pretrain done in 24.1 s: x=1",
        ),
        (
            AIRFLOW.format("18:44:13 INFO pipelines.stages.pretrain: epoch 60/60 loss=3.49"),
            "  pretrain: epoch 60/60 loss=3.49",
        ),
        (
            "18:44:13 INFO pipelines.stages.federate: round 2/12 val_accuracy=0.9\n",
            "  federate: round 2/12 val_accuracy=0.9",
        ),
        ("Stage 'ingest' didn't change, skipping\n", "Stage 'ingest' didn't change, skipping"),
        (AIRFLOW.format("Pushing xcom"), None),
        (AIRFLOW.format("18:44:13 INFO pipelines.io: wrote a file"), None),
    ],
)
def test_progress_line_keeps_stage_progress_and_drops_airflow_noise(line, shown):
    assert progress_line(line) == shown
