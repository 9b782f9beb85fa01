"""SIGKILL a stage anywhere: its previous outputs stay whole, and the rerun resumes.

For pretrain and federate, each in one workspace, run as DVC and Airflow run them
(``lepton stage run``, forked from the test session's warm stage runner as ``lepton run``
forks them; the plain federate series starts each attempt in a process of its own, as a
bare ``dvc repro`` does): an uninterrupted run gives the reference weights; a shorter run
leaves *previous outputs*; then attempts of the longer config are killed at seeded random
moments (start-up, the epochs or rounds, checkpoint writes, the final output writes), five
times per stage, and one more attempt finishes (tests/kill_harness.py). After every kill
the outputs are either byte for byte the previous ones or, when the attempt died after its
commit, the finished ones; never a mix or a gap. Until the commit, the checkpoint holds
every epoch or round the killed attempt reported but the last (pretrain logs an epoch just
before saving it), so a rerun resumes at most one epoch or round back.
An attempt resumed, and the final weights equal the reference's bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_federation_workspace, make_workspace, run_stage
from tests.kill_harness import checkpoint_progress, kill_until_done, outputs_digest, timed_run

pytestmark = pytest.mark.slow

KILLS = 5  # per test: 15 kills over the two stages

FEDERATE = {"rounds": 8, "local_epochs": 1, "augment": False, "min_local_steps": 0}
PRETRAIN = {"epochs": 30, "batch_size": 64, "embedding_dim": 16, "warmup_epochs": 2}
RECORD_DP = {"enabled": True, "unit": "record", "noise_multiplier": 1.0, "sample_rate": 0.25}


def set_param(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_workspace(tmp_path: Path) -> Path:
    """Digits as federate reads them, plus an unlabeled pool for pretrain."""
    from pipelines.io import Paths, concat_tables, read_image_table, write_image_table

    root = make_workspace(tmp_path / "ws", {"federate": FEDERATE, "pretrain": PRETRAIN})
    make_federation_workspace(root)
    paths = Paths(root)
    clients = [read_image_table(p) for p in sorted((paths.partitions / "clients").glob("*"))]
    pool = concat_tables(clients[:2])  # 300 rows: epochs long enough to be killed in
    write_image_table(pool, paths.partitions / "unlabeled.parquet")
    return root


def kill_and_check(
    root: Path,
    stage: str,
    unit: str,
    total: int,
    weights: str,
    seed: int,
    as_airflow_task: bool = False,
    same: tuple[str, ...] = (),
    stage_runner: bool = True,
):
    """The kill series of the module docstring for ``stage`` (``total`` epochs or rounds);
    the files in ``same`` must also end as the uninterrupted run wrote them.
    ``stage_runner``: every run is forked from the session's warm stage runner (else each
    starts in a process of its own)."""
    outputs = [f"models/{stage}", f"reports/{stage}.json"]
    timing = timed_run(root, stage, stage_runner)
    reference = (root / weights).read_bytes()
    reference_files = outputs_digest(root, list(same))
    assert checkpoint_progress(root, stage) == 0, "the checkpoint is cleared after the commit"

    set_param(root, stage, unit, 3)
    run_stage(root, stage, stage_runner=stage_runner)
    previous = outputs_digest(root, outputs)
    assert (root / weights).read_bytes() != reference

    set_param(root, stage, unit, total)
    series = kill_until_done(
        root,
        stage,
        outputs,
        previous,
        timing,
        (weights, reference),
        kills=KILLS,
        seed=seed,
        as_airflow_task=as_airflow_task,
        stage_runner=stage_runner,
    )
    assert len(series.kills) == KILLS, (timing, series.kills)
    for number, kill in enumerate(series.kills):
        assert kill.outputs != "broken", f"kill {number} broke the outputs: {kill}"
        if kill.outputs == "previous":  # not committed yet: it resumes at most one back
            assert kill.checkpointed >= kill.reported - 1, (number, kill)
    assert series.resumed_from, "no attempt resumed from a checkpoint"
    assert (root / weights).read_bytes() == reference
    assert outputs_digest(root, list(same)) == reference_files
    assert checkpoint_progress(root, stage) == 0
    leftovers = [p.name for p in (root / "models").iterdir() if ".tmp-" in p.name]
    assert not leftovers, leftovers
    return series


def test_federate_killed_again_and_again_resumes_to_the_same_weights(tmp_path):
    root = stage_workspace(tmp_path)
    weights = "models/federate/model.safetensors"
    # each attempt in a process of its own, as under a plain `dvc repro`: kills during
    # start-up come in the imports too (the other series fork from the warm stage runner)
    kill_and_check(root, "federate", "rounds", 8, weights, seed=7, stage_runner=False)
    assert json.loads((root / "reports/federate.json").read_text())["rounds"] == 8


def record_dp_workspace(tmp_path: Path, rounds: int = 8) -> Path:
    """Four digits clients under record-level DP on the fixed scattering features."""
    federate = {**FEDERATE, "rounds": rounds, "learning_rate": 2.0, "dp": RECORD_DP}
    root = make_workspace(
        tmp_path / "ws", {"federate": federate, "pretrain": {"method": "scattering"}}
    )
    make_federation_workspace(
        root, clients=4, rows_per_client=None, shuffle_seed=0, encoder_kind="scattering"
    )
    return root


def test_record_level_federate_killed_resumes_its_accountants(tmp_path):
    """Under record-level DP the checkpoint holds each client's accountant and noisy row
    count: the resumed run ends with the same head, the same counts and the same ε."""
    from pipelines.federated.privacy import CARRIED_TAG, ROUND_EPSILON_METRIC
    from pipelines.tracking import client

    root = record_dp_workspace(tmp_path, rounds=16)  # rounds of ~0.1 s: room for 5 kills
    weights = "models/federate/model.safetensors"
    kill_and_check(
        root, "federate", "rounds", 16, weights, seed=9, same=("models/federate/sites.json",)
    )
    # the privacy ledger: every killed attempt that released a round was resumed, so it is
    # carried by the attempt after it and counted once, in the finished run's ε
    mlflow = client(root)
    runs = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    killed = [
        r for r in runs if r.info.status != "FINISHED" and ROUND_EPSILON_METRIC in r.data.metrics
    ]
    assert killed and all(CARRIED_TAG in r.data.tags for r in killed)


def test_pretrain_killed_as_an_airflow_task_resumes_on_each_retry(tmp_path):
    """The command the DAG's task runs (dvc repro of the stage), killed, retried."""
    root = stage_workspace(tmp_path)
    weights = "models/pretrain/encoder.safetensors"
    series = kill_and_check(root, "pretrain", "epochs", 30, weights, seed=8, as_airflow_task=True)
    assert "Running stage 'pretrain'" in series.finished_log
