"""What a site does with each message of a Flower run, on plain values.

:func:`run_step` is the one place a site answers ``query`` (check its data against the
run's, its name and counts, the class statistics of its rows), ``train`` (the shared client
step, or federated SimCLR's) and ``evaluate`` (the final model on its held-out rows); under
record-level DP ``record-count`` (its noisy row count) and ``record-train`` (DP-SGD on the
head), each spending in the site's accountant, whose state comes in and goes back out as
JSON (config ``accountant`` → info ``accountant``) for the ClientApp to keep.
Config in, config out; weights as NumPy arrays by name. The ClientApp
(:mod:`pipelines.federated.flower`) calls it in its own process, or hands the message to
the site's warm worker (:mod:`pipelines.federated.site_worker`), which calls it with torch
and the site's rows already loaded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.federated.sites import SiteData, check_site_data

Arrays = dict[str, np.ndarray]
ACCOUNTANT = "accountant"  # config in, info out: the site's accountant state (JSON)
ACCOUNTANT_KEY = "accountant-key"  # config: the record-level run whose accountant to keep
RECORD_STEP = "record-step"  # config: run this record-level DP step instead of the message's
NAME_ONLY = "name-only"  # config of a query under record-level DP: no row counts back
PRIVATE_HEAD = ("private-head.weight", "private-head.bias")  # float64, record-level DP


def _state(arrays: Arrays):
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def _arrays(state) -> Arrays:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}


def query(data: SiteData, config: dict[str, Any], arrays: Arrays) -> tuple[dict, dict, Arrays]:
    """Refuse data unlike the run's (``expected``); name and counts (only the name with
    ``name-only``); with ``model-config`` the class statistics of the site's rows under the
    given weights."""
    from pipelines.federated.fedavg import client_class_statistics

    if "expected" in config:
        check_site_data(data.train, json.loads(str(config["expected"])), data.source)
    if NAME_ONLY in config:
        return {"site": data.name}, {}, {}
    info = {"site": data.name, "rows": len(data.train.labels), "holdout-rows": data.holdout_rows}
    if "model-config" not in config:
        return info, {}, {}
    stats = client_class_statistics(
        _state(arrays), data.train, "cpu", model_config=json.loads(str(config["model-config"]))
    )
    return info, {}, _arrays(stats)


def train(data: SiteData, config: dict[str, Any], arrays: Arrays) -> tuple[dict, dict, Arrays]:
    """The round's local training from the given weights: new weights, rows, mean loss."""
    from pipelines.config import FederateParams
    from pipelines.federated.fedavg import train_client
    from pipelines.federated.ssl import train_ssl_client

    step = train_client
    if str(config.get("task", "classifier")) == "simclr":
        step = functools.partial(
            train_ssl_client,
            temperature=float(config["temperature"]),
            weight_decay=float(config["weight-decay"]),
            warmup_steps=int(config.get("warmup-steps", 0)),
        )
    new_state, size, loss = step(
        _state(arrays),
        data.train,
        FederateParams.model_validate_json(str(config["params"])),
        int(config["seed"]),
        str(config["device"]),
        model_config=json.loads(str(config["model-config"])),
    )
    return {"site": data.name}, {"num-examples": int(size), "loss": float(loss)}, _arrays(new_state)


def evaluate(data: SiteData, config: dict[str, Any], arrays: Arrays) -> tuple[dict, dict, Arrays]:
    """Accuracy of the given classifier on the site's held-out rows (rows 0: none kept)."""
    from pipelines.federated.fedavg import client_model, evaluate_accuracy

    metrics: dict[str, Any] = {"rows": 0, "accuracy": 0.0}
    if data.holdout is not None and len(data.holdout.labels):
        model = client_model(json.loads(str(config["model-config"])), _state(arrays))
        accuracy = evaluate_accuracy(model, data.holdout, "cpu")
        metrics = {"rows": len(data.holdout.labels), "accuracy": accuracy}
    return {"site": data.name}, metrics, {}


def accountant_file(node_config: dict[str, Any], key: str) -> Path | None:
    """Where a site keeps its accountant for the record-level run ``key`` (sent by the
    server, the same in a resumed run): ``<node config "state">/accountant-<key>.json``;
    None when the node config names no ``state`` folder or there is no key. A key other
    than 16–64 hex digits is refused (it becomes a file name)."""
    import re

    if not key or "state" not in node_config:
        return None
    if not re.fullmatch(r"[0-9a-f]{16,64}", key):
        raise RuntimeError(f"record-level DP: a malformed accountant key {key[:80]!r}")
    return Path(str(node_config["state"])) / f"accountant-{key}.json"


def _accountant(config: dict[str, Any], first_use: bool = False):
    """The site's accountant from the state its ClientApp keeps; a new one only on
    ``first_use`` (the row-count release before round 1). A training round without it (a
    SuperNode restarted mid-run, its ``context.state`` lost) is refused: starting again from
    ε = 0 would under-count what the site has spent."""
    from pipelines.federated.record_dp import ClientAccountant

    if ACCOUNTANT in config:
        return ClientAccountant.from_state(json.loads(str(config[ACCOUNTANT])))
    if not first_use:
        raise RuntimeError(
            "record-level DP: this site's accountant is gone (its SuperNode restarted during "
            "the run?); the run cannot go on without what the site has spent so far"
        )
    return ClientAccountant(float(config["delta"]), str(config["accountant-kind"]))


def _noise_generator(config: dict[str, Any]):
    """The round's sampling and noise stream: the run's seed on a loopback deployment
    (reproducible; the rows are in the workspace anyway), else the site's own entropy,
    which the server never sees (``secrets``)."""
    import secrets

    from pipelines.federated.record_dp import generator_for

    seed = int(config["noise-seed"]) if "noise-seed" in config else secrets.randbits(63)
    return generator_for(seed)


def record_count(
    data: SiteData, config: dict[str, Any], arrays: Arrays
) -> tuple[dict, dict, Arrays]:
    """Record-level DP, before the first round: the site's row count plus Gaussian noise
    (``count-noise`` × N(0, 1), at least 1), spent in its accountant. The true count and
    the held-out rows' count are not sent."""
    from pipelines.federated.record_dp import release_noisy_count

    accountant = _accountant(config, first_use=True)
    released = release_noisy_count(
        len(data.train.labels), float(config["count-noise"]), _noise_generator(config), accountant
    )
    info = {"site": data.name, ACCOUNTANT: json.dumps(accountant.to_state())}
    return info, {"rows-released": released, "epsilon": accountant.epsilon()}, {}


def record_train(
    data: SiteData, config: dict[str, Any], arrays: Arrays
) -> tuple[dict, dict, Arrays]:
    """Record-level DP, one round: DP-SGD steps on the linear head over the fixed
    encoder's features of the site's rows, under the server's public feature map
    (:mod:`~pipelines.federated.feature_projection`, in the message's arrays)
    (:func:`~pipelines.federated.record_dp.private_head_training`), spent in the site's
    accountant. Sends back the head and ``ε`` so far, nothing else."""
    import torch

    from pipelines.federated.feature_projection import FeatureProjection
    from pipelines.federated.fedavg import client_model
    from pipelines.federated.record_dp import RecordDPSettings, private_head_training
    from pipelines.federated.record_federation import client_features

    accountant = _accountant(config)
    settings = RecordDPSettings(**json.loads(str(config["settings"])))
    weight, bias = (torch.from_numpy(np.array(arrays.pop(k), copy=True)) for k in PRIVATE_HEAD)
    projection = FeatureProjection.from_arrays(arrays)
    if len(data.train.labels):
        encoder = client_model(json.loads(str(config["model-config"])), _state(arrays)).encoder
        features, labels = client_features(encoder.eval(), data.train)
        features = projection.apply(features)
        weight, bias = private_head_training(
            weight, bias, features, labels, settings, _noise_generator(config)
        )
        accountant.spend(settings.noise_multiplier, settings.sample_rate, settings.steps)
    info = {"site": data.name, ACCOUNTANT: json.dumps(accountant.to_state())}
    out = {PRIVATE_HEAD[0]: weight.numpy(), PRIVATE_HEAD[1]: bias.numpy()}
    return info, {"epsilon": accountant.epsilon()}, out


def secure_train(
    data: SiteData, config: dict[str, Any], arrays: Arrays
) -> tuple[dict, dict, Arrays]:
    """A SecAgg+ round's local training (:func:`~pipelines.federated.flower_secagg.
    secure_update`) from the weights in ``arrays`` (``p00000``, ``p00001``…: the tensors in
    sorted key order): the update as one flat vector (``update``), rows and mean loss. The
    ClientApp's SecAgg+ mod masks the update before it leaves the site."""
    from pipelines.federated.fedavg import train_client
    from pipelines.federated.flower_secagg import secure_update

    parameters = [arrays[key] for key in sorted(arrays)]
    update, size, loss = secure_update(data, config, parameters, train_client)
    return {}, {"num-examples": size, "loss": loss}, {"update": update}


def secure_statistics(
    data: SiteData, config: dict[str, Any], arrays: Arrays
) -> tuple[dict, dict, Arrays]:
    """SecAgg+ before round 1: the class statistics of the site's rows under the weights in
    ``arrays`` (as :func:`secure_train` takes them) as one flat vector (``update``,
    :func:`~pipelines.federated.flower_secagg.statistics_vector`, scaled by
    ``statistics-scale``), weight 1; the SecAgg+ mod masks it, the server learns the sum."""
    from pipelines.federated.fedavg import client_class_statistics
    from pipelines.federated.flower_secagg import state_from_parameters, statistics_vector

    model_config = json.loads(str(config["model-config"]))
    state = state_from_parameters([arrays[key] for key in sorted(arrays)], model_config)
    stats = client_class_statistics(state, data.train, "cpu", model_config=model_config)
    vector = statistics_vector(stats, float(config["statistics-scale"]))
    return {}, {"num-examples": 1, "loss": 0.0}, {"update": vector}


STEPS = {
    "query": query,
    "train": train,
    "secure-train": secure_train,
    "secure-statistics": secure_statistics,
    "evaluate": evaluate,
    "record-count": record_count,
    "record-train": record_train,
}


def run_step(
    kind: str, data: SiteData, config: dict[str, Any], arrays: Arrays
) -> tuple[dict, dict, Arrays]:
    """``(info, metrics, arrays)`` of message ``kind`` (``query``, ``train``, ``evaluate``,
    ``secure-train`` and ``secure-statistics`` under SecAgg+, and under record-level DP
    ``record-count`` and
    ``record-train``)."""
    return STEPS[kind](data, config, arrays)
