"""Secure aggregation on the Flower runtime: Flower's SecAgg+ as one more transport of the
shared round loop.

Each round of :func:`~pipelines.federated.fedavg.run_federation` that runs with
``federate.secure_aggregation`` sends its sampled sites through Flower's
``SecAggPlusWorkflow`` (:func:`make_secagg_collect`): the sites mask their updates
(``secaggplus_mod`` at the ClientApp, :func:`secure_train`; the training itself is
the site step ``secure-train``, in the site's warm worker), and the server learns only
their sample-weighted mean, which the loop hands to the server optimizer as it would the
in-process mean. So FedAvg, FedProx, FedAdam, the server learning rate, ``min_clients``,
``client_timeout_seconds`` and the seeded client sampling all hold; what needs each update
(robust aggregators, the update-norm bound, DP clipping) is refused by the config.

Row counts and the training loss travel in clear (the mean needs the counts). Each update is
clipped to ``±CLIPPING_RANGE`` per value and quantized before masking (2**22 levels); the
sample weight is ``rows / max_rows`` with ``max_rows`` the largest site's row count, so it
never overflows. The class-mean head, which needs per-site class statistics, is not used:
the head starts from its seeded random init. This module imports ``flwr`` (the Flower
environment, ``.venv-flower``).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

CLIPPING_RANGE = 8.0
SECAGG_CONFIG_RECORD = "secaggplus_configs"  # flwr's RECORD_KEY_CONFIGS: a SecAgg+ message


def _to_state(arrays, template):
    """NumPy arrays in ``template``'s key order → a state dict with its dtypes."""
    import torch

    return {
        key: torch.as_tensor(np.asarray(array)).to(value.dtype).reshape(value.shape)
        for (key, value), array in zip(template.items(), arrays, strict=True)
    }


def _to_arrays(state) -> list[np.ndarray]:
    """The tensors of ``state`` in sorted key order (the order both sides agree on)."""
    return [state[key].detach().cpu().numpy() for key in sorted(state)]


def _in_state_order(flat, state):
    """A flat update over ``state``'s float tensors in sorted key order → in ``state``'s order."""
    import torch

    from pipelines.federated.strategies import float_keys

    parts, offset = {}, 0
    for key in sorted(float_keys(state)):
        size = state[key].numel()
        parts[key] = flat[offset : offset + size]
        offset += size
    return torch.cat([parts[key] for key in float_keys(state)])


def secure_when_asked(msg, context, call_next):
    """ClientApp mod: SecAgg+ (``secaggplus_mod``) for the messages of a secure round,
    anything else straight to the handler."""
    from flwr.client.mod import secaggplus_mod

    if SECAGG_CONFIG_RECORD in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_update(data, config, parameters: list[np.ndarray], trainer: Callable):
    """A SecAgg+ round's local training at a site: the shared client step from the round's
    weights ``parameters`` (the model's tensors in sorted key order) on ``data``'s rows;
    returns ``(update, rows, loss)`` with the update as one flat float32 vector."""
    import torch

    from pipelines.config import FederateParams
    from pipelines.federated.strategies import flatten_update
    from pipelines.models.encoder import build_classifier

    model_config = json.loads(str(config["model-config"]))
    template = dict(sorted(build_classifier(model_config).state_dict().items()))
    state = _to_state(parameters, template)
    new_state, size, loss = trainer(
        state,
        data.train,
        FederateParams.model_validate_json(str(config["params"])),
        int(config["seed"]),
        str(config["device"]),
        model_config=model_config,
    )
    update = flatten_update(new_state, state).to(torch.float32).numpy()
    return update, int(size), float(loss)


def secure_train(msg, run_update: Callable):
    """ClientApp, inside ``secaggplus_mod``: ``run_update(config, parameters)`` (the site
    step :func:`secure_update`, in the site's warm worker or here) and its update as one
    flat vector in a legacy ``FitRes`` (the mod masks it before it leaves)."""
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    update, size, loss = run_update(dict(fitins.config), parameters_to_ndarrays(fitins.parameters))
    fitres = FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters([update]), int(size), {"loss": float(loss)}
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def make_secagg_collect(grid, context, order: list[int], round_config: Callable, max_rows: int):
    """The round loop's ``collect`` over SecAgg+: one ``SecAggPlusWorkflow`` run per round
    for the chosen sites (``order[index]`` is a site's node id; ``round_config(index,
    round_params, round_index)`` its training config). Returns a
    :class:`~pipelines.federated.fedavg.RoundUpdates` that holds only the mean update."""
    import torch
    from flwr.app import ConfigRecord
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    from pipelines.federated.fedavg import RoundUpdates
    from pipelines.federated.strategies import Rejection

    class OneRound(Strategy):
        """The chosen sites with their own configs; keeps what SecAgg+ aggregated."""

        def __init__(self, chosen, arrays, round_params, round_index):
            self.chosen, self.arrays = chosen, arrays
            self.round_params, self.round_index = round_params, round_index
            self.results, self.failures = [], []

        def configure_fit(self, server_round, parameters, client_manager):
            return [
                (
                    GridClientProxy(order[index], grid, context.run_id),
                    FitIns(
                        parameters,
                        round_config(index, self.round_params, self.round_index),
                    ),
                )
                for index in self.chosen
            ]

        def aggregate_fit(self, server_round, results, failures):
            self.results, self.failures = results, failures
            return (results[0][1].parameters if results else None), {}

        def initialize_parameters(self, client_manager):
            return None

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    def collect(global_state, chosen, round_params, round_index) -> RoundUpdates:
        index_of = {node: index for index, node in enumerate(order)}  # order may change
        arrays = _to_arrays(global_state)
        strategy = OneRound(chosen, arrays, round_params, round_index)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: round_index}
        )
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(arrays), keep_input=True
        )
        sampled = len(chosen)  # every sampled site shares its keys with every other; any
        SecAggPlusWorkflow(  # one may drop out (two or more sampled sites are needed)
            num_shares=1.0,
            reconstruction_threshold=max(2, sampled - 1) / max(sampled, 2),
            clipping_range=CLIPPING_RANGE,
            max_weight=float(max_rows),
            timeout=round_params.client_timeout_seconds,
        )(grid, legacy)
        result = RoundUpdates()
        answered = set()
        for proxy, fitres in strategy.results:
            index = index_of[proxy.node_id]
            answered.add(index)
            result.clients.append(index)
            result.sizes.append(int(fitres.num_examples))
            result.losses.append(float(fitres.metrics["loss"]))
        if strategy.results:
            mean = parameters_to_ndarrays(strategy.results[0][1].parameters)[0]
            flat = torch.as_tensor(np.asarray(mean, dtype=np.float64))
            result.mean = _in_state_order(flat, global_state)
        for index in chosen:
            if index not in answered:
                reason = "left the SecAgg+ protocol (no reply, a failure, or it halted)"
                result.dropped.append(Rejection(index, reason))
        return result

    return collect
