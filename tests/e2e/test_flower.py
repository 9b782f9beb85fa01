"""The federate stage on Flower's deployment engine, on loopback: a SuperLink and K=3
SuperNodes as subprocesses, each reading only its own shard, for 2 rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import CommonParams, FederateParams, FederationParams, Params
from pipelines.federated.flower_deploy import flower_bin
from pipelines.io import read_json
from pipelines.stages import federate
from tests.conftest import make_federation_workspace

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (flower_bin() / "flower-superlink").exists(),
        reason="the Flower environment is missing: run `make flower-setup`",
    ),
]


class Tracker:
    run_id = None  # no MLflow run: checkpoints have no owner

    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int = 0) -> None:
        self.metrics.append((dict(metrics), step))

    def log_dataset(self, *args) -> None:
        pass

    def log_artifact(self, *args) -> None:
        pass

    def log_params(self, params) -> None:
        pass

    def set_tags(self, tags, on_parent: bool = False) -> None:
        pass


def test_flower_loopback_matches_the_simulation_round_by_round(tmp_path: Path):
    paths = make_federation_workspace(tmp_path / "ws")
    base = FederateParams(rounds=2, local_epochs=1, batch_size=64)
    results = {}
    for runtime in ("simulation", "flower"):
        params = Params(
            common=CommonParams(seed=0, device="cpu"),
            federate=base.model_copy(update={"runtime": runtime}),
        )
        tracker = Tracker()
        metrics = federate.run(params, paths, tracker)
        out = paths.model_dir("federate")
        assert {p.name for p in out.iterdir()} == {
            "model.safetensors",
            "model.json",
            "rounds.csv",
            "sites.json",
        }
        assert read_json(paths.report("federate")) == pytest.approx(metrics)
        per_round = [
            (m["round_val_accuracy"], step)
            for m, step in tracker.metrics
            if "round_val_accuracy" in m
        ]
        results[runtime] = (metrics, per_round, (out / "model.safetensors").read_bytes())

    simulation, flower = results["simulation"], results["flower"]
    assert flower[0]["rounds"] == 2 and flower[0]["clients"] == 3
    assert [step for _, step in flower[1]] == [1, 2]
    # the same client code, seeds and server code: the same numbers, round by round
    for (a, _), (b, _) in zip(simulation[1], flower[1], strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    assert flower[0]["val_accuracy"] == pytest.approx(simulation[0]["val_accuracy"], abs=1e-6)
    # nothing of the Flower run is left in the workspace but its outputs
    assert not [p for p in (paths.root / ".lepton").iterdir() if p.name.startswith("flower-")]
    assert json.loads((paths.model_dir("federate") / "model.json").read_text())["num_classes"] == 10


def test_secure_aggregation_with_fedadam_matches_the_in_process_run(tmp_path: Path):
    """SecAgg+ is a transport of the shared loop: with FedAdam, a server learning rate and
    seeded sampling of 2 of 3 sites a round, every round's training loss matches the
    in-process run within 1e-3 and its val accuracy within one of the 200 val rows (SecAgg+
    quantizes each update to 2**22 levels). The class-mean head comes from the sites'
    statistics summed under SecAgg+ too, as the in-process run's from the plain ones."""
    from pipelines.federated.fedavg import (
        init_head_from_class_means,
        run_federation,
        start_classifier,
    )
    from pipelines.io import load_weights, read_image_table
    from pipelines.models.encoder import load_encoder

    paths = make_federation_workspace(tmp_path / "ws")
    base = FederateParams(
        rounds=3,
        local_epochs=1,
        batch_size=64,
        strategy="fedadam",
        server_learning_rate=0.01,
        client_fraction=0.67,
        min_clients=2,
    )
    params = Params(
        common=CommonParams(seed=0, device="cpu"),
        federate=base.model_copy(update={"runtime": "flower", "secure_aggregation": True}),
    )
    metrics = federate.run(params, paths, Tracker())
    rows = (paths.model_dir("federate") / "rounds.csv").read_text().splitlines()[1:]
    secure = [[float(v) for v in r.split(",")] for r in rows]  # round,val,loss,accepted,...
    state, _ = load_weights(paths.model_dir("federate"), "model")

    # the same start model the stage builds, its head from the clients' class means
    model = start_classifier(load_encoder(paths.model_dir("pretrain")), 10, seed=0)
    clients = [read_image_table(p) for p in sorted((paths.partitions / "clients").glob("*"))]
    trained, plain = run_federation(
        model.config,
        init_head_from_class_means(model.config, model.state_dict(), clients, "cpu"),
        clients,
        read_image_table(paths.partitions / "val.parquet"),
        base,
        0,
        "cpu",
    )
    assert metrics["rounds"] == 3 and len(secure) == 3
    for row, expected in zip(secure, plain, strict=True):
        assert row[3] == expected["accepted"] == 2
        assert row[2] == pytest.approx(expected["train_loss"], abs=1e-3)
        # a val row near the decision boundary may flip on the quantization: at most one
        assert row[1] == pytest.approx(expected["val_accuracy"], abs=1 / 200 + 1e-9)
    # the weights too, up to FedAdam's step on SecAgg+'s quantization noise: a coordinate
    # whose second moment is near zero moves by up to ~lr/5 on noise (measured max 0.0019)
    for key, value in trained.state_dict().items():
        assert (state[key].double() - value.double()).abs().max() < 5e-3, key


def test_federated_pretraining_on_flower_matches_the_simulation(tmp_path: Path):
    """pretrain.mode: federated on the loopback deployment: each SuperNode trains SimCLR on
    its own shard; the round losses and the encoder match the in-process run."""
    from pipelines.config import PretrainParams
    from pipelines.io import load_weights
    from pipelines.stages import pretrain

    paths = make_federation_workspace(tmp_path / "ws")
    base = PretrainParams(mode="federated", rounds=2, local_epochs=1, embedding_dim=16)
    results = {}
    for runtime in ("simulation", "flower"):
        params = Params(
            common=CommonParams(seed=0, device="cpu"),
            pretrain=base.model_copy(update={"runtime": runtime}),
        )
        tracker = Tracker()
        metrics = pretrain.run(params, paths, tracker)
        losses = [m["round_train_loss"] for m, _ in tracker.metrics if "round_train_loss" in m]
        state, _ = load_weights(paths.model_dir("pretrain"), "encoder")
        results[runtime] = (metrics, losses, state)
    simulation, flower = results["simulation"], results["flower"]
    assert len(flower[1]) == 2 and flower[1] == pytest.approx(simulation[1], abs=1e-5)
    for key, value in simulation[2].items():
        assert (flower[2][key] - value).abs().max() < 1e-4, key
    assert flower[0]["val_knn_accuracy"] == pytest.approx(simulation[0]["val_knn_accuracy"])
    assert not [p for p in (paths.root / ".lepton").iterdir() if p.name.startswith("flower-")]


def test_a_supernode_refuses_a_shard_unlike_the_runs_data(tmp_path: Path):
    """Each SuperNode checks its own shard against the run's data when first queried; a
    different image size fails the run before any training, naming the site's file."""
    import numpy as np

    from pipelines.federated.flower_deploy import FlowerRuntimeError
    from pipelines.io import ImageTable, write_image_table
    from pipelines.models.encoder import load_encoder
    from pipelines.stages.federate import federate_on_flower

    paths = make_federation_workspace(tmp_path / "ws")
    shards = sorted((paths.partitions / "clients").glob("client_*.parquet"))
    odd = ImageTable(np.zeros((4, 1, 12, 12), np.float32), np.array([0, 1, 2, 3]), 10)
    write_image_table(odd, shards[2])
    (tmp_path / "run").mkdir()
    with pytest.raises(FlowerRuntimeError) as caught:
        federate_on_flower(
            load_encoder(paths.model_dir("pretrain")),
            shards,
            paths.partitions / "val.parquet",
            FederateParams(runtime="flower", rounds=1),
            FederationParams(),
            {"low": 0.0, "high": 16.0},
            0,
            "cpu",
            tmp_path / "run",
        )
    assert shards[2].name in str(caught.value) and "12x12" in str(caught.value)
    assert not (tmp_path / "run" / "out").exists()


def test_a_site_killed_mid_run_is_left_out_and_takes_part_again_when_back(tmp_path: Path):
    """SIGKILL one SuperNode once the first round is in and start it again at once (a new
    node id): the round in flight when it died goes on without it once the client timeout
    passes (min_clients 2 allows that), and the ServerApp takes the site back at the start
    of a later round. Whichever round the kill lands in (the stage hears of a round a
    moment after it ended, more on a loaded machine), the restart is up before that round's
    timeout, so the test waits on what happened, not on how fast."""
    from pipelines.config import FederationParams
    from pipelines.federated.flower_deploy import LoopbackDeployment
    from pipelines.models.encoder import load_encoder
    from pipelines.stages.federate import federate_on_flower

    paths = make_federation_workspace(tmp_path / "ws")
    shards = sorted((paths.partitions / "clients").glob("client_*.parquet"))
    params = FederateParams(
        runtime="flower",
        rounds=6,
        local_epochs=1,
        batch_size=64,
        min_clients=2,
        client_timeout_seconds=30,  # longer than a restart of a site on a loaded machine
    )
    events: list[str] = []
    (tmp_path / "run").mkdir()
    with LoopbackDeployment(shards, tmp_path / "run" / "home") as deployment:

        def on_round(round_index: int, row: dict) -> None:
            if round_index == 1:
                deployment.kill_node(2)
                deployment.start_node(2)  # returns once its worker and SuperNode listen
                events.append("killed and restarted")

        _, history, _ = federate_on_flower(
            load_encoder(paths.model_dir("pretrain")),
            shards,
            paths.partitions / "val.parquet",
            params,
            FederationParams(),
            {"low": 0.0, "high": 16.0},
            0,
            "cpu",
            tmp_path / "run",
            on_round,
            deployment=deployment,
        )
    assert events == ["killed and restarted"]
    accepted = [row["accepted"] for row in history]
    assert len(history) == 6 and accepted[0] == 3
    assert 2 in accepted, accepted  # the round without the killed site
    after = accepted[accepted.index(2) :]
    assert after[-1] == 3, accepted  # it took part again once back


def test_record_level_dp_on_flower_matches_the_simulation_with_an_accountant_per_site(
    tmp_path: Path, monkeypatch
):
    """Each SuperNode keeps its own accountant in its ClientApp state across messages: its
    ε after 3 rounds equals the in-process client's, and the rounds are the same. A run
    interrupted after round 2 (its SuperNodes stop with it) resumes from the stage's
    checkpoint, each site from the accountant it keeps on its disk: the same rounds and
    weights, and no site's ε below the uninterrupted run's."""
    import csv

    from pipelines.config import DPParams, PretrainParams
    from pipelines.tracking import stage_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LEPTON_PIPELINE_RUN", "test-record-flower")
    paths = make_federation_workspace(tmp_path / "ws", encoder_kind="scattering")
    dp = DPParams(enabled=True, unit="record", target_epsilon=3.0)
    results = {}
    for runtime in ("simulation", "flower"):
        params = Params(
            common=CommonParams(seed=0, device="cpu"),
            pretrain=PretrainParams(method="scattering"),
            federate=FederateParams(
                runtime=runtime, rounds=3, local_epochs=1, learning_rate=2.0, dp=dp
            ),
        )
        with stage_run("federate", paths.root, "lepton") as tracker:
            metrics = federate.run(params, paths, tracker)
        with (paths.model_dir("federate") / "rounds.csv").open() as handle:
            rounds = [
                value
                for row in csv.DictReader(handle)
                for value in (float(row["val_accuracy"]), float(row["epsilon"]))
            ]
        sites = read_json(paths.model_dir("federate") / "sites.json")
        results[runtime] = (metrics, rounds, sites)

    (simulation, sim_rounds, sim_sites), (flower, flower_rounds, flower_sites) = (
        results["simulation"],
        results["flower"],
    )
    assert flower["dp_unit"] == "record" and len(flower_rounds) == 2 * 3
    assert flower_rounds == pytest.approx(sim_rounds, abs=1e-6)
    assert flower["epsilon"] == pytest.approx(simulation["epsilon"], rel=1e-9)
    assert 0.5 < flower["epsilon"] <= 3.0
    for a, b in zip(sim_sites, flower_sites, strict=True):  # only noisy counts and ε leave
        assert b["rows"] is None and b["rows_released"] == pytest.approx(a["rows_released"])
        assert b["epsilon"] == pytest.approx(a["epsilon"], rel=1e-9)

    import torch
    from safetensors.torch import load_file

    weights = paths.model_dir("federate") / "model.safetensors"
    uninterrupted = load_file(weights)
    params = Params(
        common=CommonParams(seed=0, device="cpu"),
        pretrain=PretrainParams(method="scattering"),
        federate=FederateParams(
            runtime="flower", rounds=3, local_epochs=1, learning_rate=2.0, dp=dp
        ),
    )

    class Interrupted(Exception):
        pass

    from pipelines.checkpoints import clear_checkpoints

    clear_checkpoints(paths.root, "federate")  # as `lepton stage run` does after a run

    with pytest.raises(Interrupted), stage_run("federate", paths.root, "lepton") as tracker:
        log_metrics = tracker.log_metrics

        def interrupt_after_round_2(metrics, step: int = 0) -> None:
            log_metrics(metrics, step=step)
            if "round_val_accuracy" in metrics and step == 2:
                raise Interrupted

        tracker.log_metrics = interrupt_after_round_2
        federate.run(params, paths, tracker)
    kept = sorted((paths.root / ".lepton" / "sites").glob("client_*/accountant-*.json"))
    assert len(kept) == 3 * 2  # each site: this run's and the uninterrupted run's
    with stage_run("federate", paths.root, "lepton") as tracker:
        resumed = federate.run(params, paths, tracker)
    with (paths.model_dir("federate") / "rounds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["val_accuracy"]) for r in rows] == pytest.approx(flower_rounds[::2], abs=1e-6)
    again = load_file(weights)
    assert all(torch.equal(again[k], uninterrupted[k]) for k in uninterrupted)
    assert resumed["epsilon"] >= flower["epsilon"] * (1 - 1e-9)
