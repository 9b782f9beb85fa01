"""What a site does with each message of a Flower run, on plain values.

:func:`run_step` is the one place a site answers ``query`` (check its data against the
run's, its name and counts, the class statistics of its rows), ``train`` (the shared client
step, or federated SimCLR's) and ``evaluate`` (the final model on its held-out rows).
Config in, config out; weights as NumPy arrays by name. The ClientApp
(:mod:`pipelines.federated.flower`) calls it in its own process, or hands the message to
the site's warm worker (:mod:`pipelines.federated.site_worker`), which calls it with torch
and the site's rows already loaded.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np

from pipelines.federated.sites import SiteData, check_site_data

Arrays = dict[str, np.ndarray]


def _state(arrays: Arrays):
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def _arrays(state) -> Arrays:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}


def query(data: SiteData, config: dict[str, Any], arrays: Arrays) -> tuple[dict, dict, Arrays]:
    """Refuse data unlike the run's (``expected``); name and counts; with ``model-config``
    the class statistics of the site's rows under the given weights."""
    from pipelines.federated.fedavg import client_class_statistics

    if "expected" in config:
        check_site_data(data.train, json.loads(str(config["expected"])), data.source)
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


STEPS = {"query": query, "train": train, "evaluate": evaluate}


def run_step(
    kind: str, data: SiteData, config: dict[str, Any], arrays: Arrays
) -> tuple[dict, dict, Arrays]:
    """``(info, metrics, arrays)`` of message ``kind`` (``query``, ``train``, ``evaluate``)."""
    return STEPS[kind](data, config, arrays)
