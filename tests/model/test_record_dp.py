"""Record-level DP: accountants, the closed-form DP-SGD step, the federate stage under it, the
per-client ledger, the config's refusals, and the canary audit."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import (
    CommonParams,
    ConfigError,
    DPParams,
    FederateParams,
    Params,
    PartitionParams,
    PretrainParams,
    PrivacyParams,
    RegisterParams,
    validate_params,
)
from pipelines.federated.privacy import PrivacyBudgetError, client_epsilon_key
from pipelines.federated.record_dp import (
    ClientAccountant,
    RecordDPSettings,
    clipped_gradient_sum,
    epsilon_for,
    generator_for,
    local_steps,
    plan_noise_multiplier,
    private_head_training,
)
from pipelines.io import Paths, read_json, write_json
from pipelines.tracking import client, stage_run
from tests.conftest import make_federation_workspace

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def test_rdp_golden_value():
    # Opacus's RDP case: σ = 1.5, q = 0.04, 2250 steps, δ = 1e-5
    assert epsilon_for([(1.5, 0.04, 2250)], 1e-5, "rdp") == pytest.approx(7.32911, abs=1e-5)


def test_prv_golden_values():
    # Opacus 1.6's PRV accountant on the same case and on one closer to the defaults
    assert epsilon_for([(1.5, 0.04, 2250)], 1e-5, "prv") == pytest.approx(6.77913, abs=2e-3)
    assert epsilon_for([(1.0, 0.1, 100)], 1e-5, "prv") < epsilon_for([(1.0, 0.1, 100)], 1e-5, "rdp")


def test_epsilon_never_decreases_over_rounds():
    accountant = ClientAccountant(1e-5, "rdp")
    accountant.spend(20.0, 1.0, 1)  # the noisy row count
    seen = [accountant.epsilon()]
    for _ in range(6):
        accountant.spend(3.0, 0.5, 4)
        seen.append(accountant.epsilon())
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1] > seen[0]
    assert accountant.steps == 1 + 24
    again = ClientAccountant.from_state(accountant.to_state())
    assert again.history == accountant.history and again.epsilon() == seen[-1]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_planned_noise_ends_within_the_target(accountant):
    steps = local_steps(1, 0.5) * 20
    prefix = [(20.0, 1.0, 1)]
    sigma = plan_noise_multiplier(3.0, 1e-5, 0.5, steps, accountant, prefix=prefix)
    assert epsilon_for([*prefix, (sigma, 0.5, steps)], 1e-5, accountant) <= 3.0
    assert epsilon_for([*prefix, (0.98 * sigma, 0.5, steps)], 1e-5, accountant) > 3.0


def test_closed_form_clipping_matches_per_sample_autograd():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    grad_w, grad_b = clipped_gradient_sum(weight, bias, features, labels, clip_norm=0.5)
    want_w, want_b = torch.zeros_like(weight), torch.zeros_like(bias)
    for x, y in zip(features, labels, strict=True):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        torch.nn.functional.cross_entropy((x @ w.T + b)[None], y[None]).backward()
        norm = torch.cat([w.grad.flatten(), b.grad]).norm()
        scale = min(1.0, 0.5 / float(norm))
        want_w += w.grad * scale
        want_b += b.grad * scale
    torch.testing.assert_close(grad_w, want_w)
    torch.testing.assert_close(grad_b, want_b)


def test_the_divisor_is_the_expected_batch_not_the_sampled_one():
    features = torch.eye(4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    zero_w, zero_b = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    settings = RecordDPSettings(10.0, 1e-12, 0.5, 1, learning_rate=1.0, momentum=0.0)
    weight, bias = private_head_training(
        zero_w, zero_b, features, labels, settings, generator_for(3)
    )
    chosen = torch.rand(4, generator=generator_for(3), dtype=torch.float64) < 0.5
    grad_w, grad_b = clipped_gradient_sum(zero_w, zero_b, features[chosen], labels[chosen], 10.0)
    torch.testing.assert_close(weight, -grad_w / (0.5 * 4), atol=1e-9, rtol=0)
    torch.testing.assert_close(bias, -grad_b / (0.5 * 4), atol=1e-9, rtol=0)


def record_params(max_epsilon: float | None = None, **dp) -> Params:
    return Params(
        common=CommonParams(seed=0, device="cpu"),
        pretrain=PretrainParams(method="scattering"),
        federate=FederateParams(
            rounds=8,
            local_epochs=1,
            learning_rate=2.0,
            dp=DPParams(**{"enabled": True, "unit": "record", "target_epsilon": 3.0, **dp}),
        ),
        privacy=PrivacyParams(max_epsilon=max_epsilon),
    )


def test_the_config_refuses_record_dp_on_features_trained_on_client_rows():
    raw = {
        "federate": {"dp": {"enabled": True, "unit": "record"}},
        "pretrain": {"method": "simclr"},
    }
    with pytest.raises(ConfigError, match="needs features that saw no client row"):
        validate_params(raw)
    # SimCLR on a public split is accepted; federated SimCLR trains at the clients: refused
    raw["partition"] = {"public_fraction": 0.3}
    assert validate_params(raw).encoder_rows() == "public split"
    raw["pretrain"]["mode"] = "federated"
    with pytest.raises(ConfigError, match="mode 'federated'"):
        validate_params(raw)
    del raw["partition"]
    raw["pretrain"] = {"method": "scattering"}
    raw["federate"].update(runtime="flower", secure_aggregation=True)
    with pytest.raises(ConfigError, match="secure_aggregation needs federate.dp.enabled false"):
        validate_params(raw)
    raw["federate"]["secure_aggregation"] = False
    assert validate_params(raw).federate.runtime == "flower"


@pytest.fixture
def scattering_workspace(tmp_path, monkeypatch) -> Path:
    """Four digits clients, val, and the scattering encoder, with its own MLflow."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("LEPTON_PIPELINE_RUN", "test-record-dp")
    make_federation_workspace(
        tmp_path, clients=4, rows_per_client=None, shuffle_seed=0, encoder_kind="scattering"
    )
    return tmp_path


def run_federate(root: Path, p: Params):
    from pipelines.stages import federate

    with stage_run("federate", root, "lepton") as tracker:
        return tracker, federate.run(p, Paths(root), tracker)


@pytest.mark.slow
def test_record_level_federate_accounts_per_client_and_releases_no_counts(scattering_workspace):
    root = scattering_workspace
    tracker, metrics = run_federate(root, record_params(max_epsilon=5.0))
    assert metrics["dp_unit"] == "record"
    assert 2.9 < metrics["epsilon"] <= 3.0
    assert metrics["val_accuracy"] > 0.8  # 8 rounds at ε = 3: far above chance (0.1)
    with (root / "models/federate/rounds.csv").open() as handle:
        epsilons = [float(row["epsilon"]) for row in csv.DictReader(handle)]
    assert len(epsilons) == 8 and epsilons == sorted(epsilons)
    sites = read_json(root / "models/federate/sites.json")
    assert [s["site"] for s in sites] == [f"client_{k}" for k in range(4)]
    for site in sites:  # only the noisy count and ε leave a client
        assert site["rows"] is None and site["rows_released"] > 0
        assert site["epsilon"] == pytest.approx(metrics["epsilon"])
    logged = client(root).get_run(tracker.run_id).data.metrics
    per_client = [k for k in logged if k.startswith("privacy.client_epsilon.")]
    assert len(per_client) == 4
    assert all(logged[k] == pytest.approx(metrics["epsilon"]) for k in per_client)
    assert not any(k.endswith(".rows") for k in logged)

    # a second ε = 3 run would take every client to 6 > 5: refused before training,
    # naming the client's shard, outputs untouched
    before = (root / "models/federate/model.safetensors").read_bytes()
    with pytest.raises(PrivacyBudgetError, match=r"client .*client_0\.parquet"):
        run_federate(root, record_params(max_epsilon=5.0))
    assert (root / "models/federate/model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_the_ledger_is_kept_per_client_data_version(scattering_workspace):
    from pipelines.federated.privacy import spent_epsilon_by_client
    from pipelines.io import read_image_table, union_sha256

    root = scattering_workspace
    tracker, metrics = run_federate(root, record_params(target_epsilon=1.0))
    shard = read_image_table(root / "data/partitions/clients/client_2.parquet")
    sha = union_sha256([shard], 10)
    experiment = client(root).get_run(tracker.run_id).info.experiment_id
    spent = spent_epsilon_by_client(client(root), [experiment], [sha, "0" * 64])
    assert spent[sha] == pytest.approx(metrics["epsilon"])
    assert spent["0" * 64] == 0.0
    logged = client(root).get_run(tracker.run_id).data.metrics
    assert client_epsilon_key(sha) in logged


def test_the_stage_refuses_a_cnn_encoder_under_record_dp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_federation_workspace(tmp_path, clients=2, rows_per_client=50)
    with pytest.raises(ConfigError, match="needs features that saw no client row"):
        run_federate(tmp_path, record_params())
    assert not (tmp_path / "models/federate").exists()


def test_the_stage_takes_a_simclr_encoder_pretrained_on_the_public_split(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    make_federation_workspace(tmp_path, clients=2, rows_per_client=50)
    config_path = tmp_path / "models/pretrain/encoder.json"
    write_json(config_path, {**read_json(config_path), "trained_on": "public split"})
    params = Params(
        common=CommonParams(seed=0, device="cpu"),
        partition=PartitionParams(public_fraction=0.3),
        federate=FederateParams(
            rounds=2, dp=DPParams(enabled=True, unit="record", target_epsilon=3.0)
        ),
    )
    _, metrics = run_federate(tmp_path, params)
    assert metrics["dp_unit"] == "record" and 0 < metrics["epsilon"] <= 3.0
    assert read_json(tmp_path / "models/federate/model.json")["encoder"]["kind"] != "scattering"


def test_the_register_gate_has_a_floor_for_record_dp():
    from pipelines.stages.register import evaluate_gates

    p = RegisterParams(accuracy_floor=0.95, dp_accuracy_floor=0.9)
    assert evaluate_gates(0.93, None, p, 3.0, 8.0, "record")["accuracy_floor"]
    assert not evaluate_gates(0.93, None, p, 3.0, 8.0, "client")["accuracy_floor"]
    assert not evaluate_gates(0.89, None, p, 3.0, 8.0, "record")["accuracy_floor"]


def audit_setup(canaries: int = 200):
    from sklearn.datasets import load_digits

    from pipelines.data.splits import shard_clients, split_holdout
    from pipelines.io import ImageTable
    from pipelines.models.scattering import ScatteringEncoder

    data = load_digits()
    table = ImageTable((data.images / 16.0).astype(np.float32), data.target.astype(np.int64), 10)
    train, val, _ = split_holdout(table.labels, 0.2, 0.1, 0)
    canary_rows, train = train[:canaries], train[canaries:]
    shards = shard_clients(table.labels[train], 5, "dirichlet", 0.5, 10, 0)
    clients = [table.subset(train[s]) for s in shards]
    names = [f"client_{k}" for k in range(5)]
    return ScatteringEncoder((8, 8)), clients, names, table.subset(val), table.subset(canary_rows)


@pytest.mark.slow
def test_the_canary_audit_flags_a_run_without_noise_and_passes_a_dp_run():
    from pipelines.federated.audit import run_canary_audit

    encoder, clients, names, val, canaries = audit_setup()
    claimed = 0.5
    base = {"rounds": 100, "local_epochs": 5, "learning_rate": 4.0}
    private = FederateParams(
        **base, dp=DPParams(enabled=True, unit="record", target_epsilon=claimed)
    )
    _, history, audit = run_canary_audit(encoder, clients, names, val, canaries, private, 0)
    assert history[-1]["epsilon"] <= claimed
    assert audit.epsilon_lower_bound <= claimed and not audit.flags(claimed)

    # the same run with the noise left out (as a broken mechanism would): the canaries it
    # memorised refute the claim
    noiseless = FederateParams(
        **base, dp=DPParams(enabled=True, unit="record", noise_multiplier=1e-3)
    )
    _, _, leak = run_canary_audit(encoder, clients, names, val, canaries, noiseless, 0)
    assert leak.flags(claimed), leak
    assert leak.correct > 0.8 * leak.guesses


def test_the_audit_bound_follows_the_guesses():
    from pipelines.federated.audit import epsilon_for_guesses, epsilon_lower_bound

    assert epsilon_for_guesses(1000, 100, 50, 1e-5) == 0.0  # a coin toss refutes nothing
    strong = epsilon_for_guesses(1000, 100, 100, 1e-5)
    assert 2.0 < strong < 6.0 and epsilon_for_guesses(1000, 100, 90, 1e-5) < strong
    included = np.arange(200) % 2 == 0
    perfect = epsilon_lower_bound(included.astype(float), included, 1e-5)
    assert perfect.correct == perfect.guesses > 0 and perfect.epsilon_lower_bound > 0
    rng = np.random.default_rng(0)
    assert epsilon_lower_bound(rng.random(200), included, 1e-5).epsilon_lower_bound < 0.5
    assert math.isfinite(perfect.epsilon_lower_bound)


def test_a_site_step_keeps_its_accountant_and_refuses_a_round_without_it():
    """The Flower site steps under record DP: the count release starts the site's
    accountant; a training round carries it on, and a round without it (a SuperNode that
    restarted and lost its ClientApp state) is refused rather than counted from ε = 0."""
    import dataclasses
    import json

    from sklearn.datasets import load_digits

    from pipelines.federated.feature_projection import fit_feature_projection
    from pipelines.federated.fedavg import start_classifier
    from pipelines.federated.site_steps import ACCOUNTANT, PRIVATE_HEAD, run_step
    from pipelines.federated.sites import SiteData
    from pipelines.io import ImageTable
    from pipelines.models.scattering import ScatteringEncoder

    data = load_digits()
    rows = ImageTable((data.images[:120] / 16).astype(np.float32), data.target[:120], 10)
    site = SiteData("a", rows, None, "a.npz")
    base = {"delta": 1e-5, "accountant-kind": "rdp", "noise-seed": 3}
    info, metrics, _ = run_step("record-count", site, {**base, "count-noise": 20.0}, {})
    assert info["site"] == "a" and metrics["rows-released"] > 0 and metrics["epsilon"] > 0
    encoder = ScatteringEncoder((8, 8), 1, 1)
    settings = RecordDPSettings(1.0, 2.0, 1.0, 1, 1.0)
    dim = encoder.embedding_dim
    projection = fit_feature_projection(torch.randn(50, dim, dtype=torch.float64), 5)
    model = start_classifier(encoder, 10, 0)
    arrays = {
        **{k: v.numpy() for k, v in model.state_dict().items()},
        **projection.to_arrays(),
        PRIVATE_HEAD[0]: np.zeros((10, 5)),
        PRIVATE_HEAD[1]: np.zeros(10),
    }
    config = {
        **base,
        "settings": json.dumps(dataclasses.asdict(settings)),
        "model-config": json.dumps({"encoder": encoder.config, "num_classes": 10}),
    }
    with pytest.raises(RuntimeError, match="accountant is gone"):
        run_step("record-train", site, config, dict(arrays))
    trained, spent, out = run_step(
        "record-train", site, {**config, ACCOUNTANT: info[ACCOUNTANT]}, dict(arrays)
    )
    assert out[PRIVATE_HEAD[0]].shape == (10, 5) and np.abs(out[PRIVATE_HEAD[0]]).sum() > 0
    assert spent["epsilon"] > metrics["epsilon"]
    assert set(spent) == {"epsilon"} and set(trained) == {"site", ACCOUNTANT}
