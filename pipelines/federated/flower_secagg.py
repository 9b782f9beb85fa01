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
never overflows. The class-mean head needs only the sum of the sites' class statistics:
one SecAgg+ run before round 1 sums them, masked (:func:`secure_class_statistics`). This
module imports ``flwr`` (the Flower environment, ``.venv-flower``).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

CLIPPING_RANGE = 8.0
NORM_SCALE = 1024.0  # the class statistics' norm sum: mean embedding norms up to 1024 fit
STATISTICS_CLIPPING = 1.0  # every value of a statistics vector is within ±1
SECURE_TASK = "secure-task"  # config of a SecAgg+ message: "statistics" (else training)
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


def state_from_parameters(parameters: list[np.ndarray], model_config: dict) -> dict:
    """The round's weights as SecAgg+ sends them (the tensors in sorted key order) → the
    model's state dict."""
    from pipelines.models.encoder import build_classifier

    template = dict(sorted(build_classifier(model_config).state_dict().items()))
    return _to_state(parameters, template)


def statistics_vector(statistics: dict, scale: float) -> np.ndarray:
    """A site's class statistics (:func:`~pipelines.federated.fedavg.
    client_class_statistics`) as one flat float32 vector inside SecAgg+'s clipping range:
    the per-class sums of unit embeddings and the counts divided by ``scale`` (the largest
    site's row count, so each value is at most 1), the sum of embedding norms by ``scale *
    NORM_SCALE``."""
    parts = [
        statistics["sums"].reshape(-1) / scale,
        statistics["counts"].reshape(-1) / scale,
        statistics["norm_sum"].reshape(1) / (scale * NORM_SCALE),
    ]
    return np.concatenate([np.asarray(part, dtype=np.float64) for part in parts]).astype(np.float32)


def statistics_from_mean(mean: np.ndarray, sites: int, num_classes: int, scale: float) -> dict:
    """The summed class statistics of ``sites`` sites from the mean of their
    :func:`statistics_vector` (each sent with weight 1)."""
    import torch

    total = torch.as_tensor(np.asarray(mean, dtype=np.float64)) * sites
    dim = (len(total) - num_classes - 1) // num_classes
    sums = total[: num_classes * dim].reshape(num_classes, dim) * scale
    counts = total[num_classes * dim : num_classes * (dim + 1)] * scale
    norm_sum = total[-1] * scale * NORM_SCALE
    return {"sums": sums, "counts": counts.round(), "norm_sum": norm_sum}


def secure_update(data, config, parameters: list[np.ndarray], trainer: Callable):
    """A SecAgg+ round's local training at a site: the shared client step from the round's
    weights ``parameters`` (the model's tensors in sorted key order) on ``data``'s rows;
    returns ``(update, rows, loss)`` with the update as one flat float32 vector."""
    import torch

    from pipelines.config import FederateParams
    from pipelines.federated.strategies import flatten_update

    model_config = json.loads(str(config["model-config"]))
    state = state_from_parameters(parameters, model_config)
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


def _secagg_round(
    grid,
    context,
    order,
    chosen,
    arrays,
    config_of,
    max_weight,
    timeout,
    index,
    clipping_range: float = CLIPPING_RANGE,
    quantization_range: int = 2**22,
):
    """One ``SecAggPlusWorkflow`` run: ``arrays`` (a list, the tensors in sorted key order)
    to the ``chosen`` sites (``order[i]`` is site ``i``'s node id) with ``config_of(i)``;
    each vector clipped to ``±clipping_range`` and quantized to ``quantization_range``
    levels; returns ``(answered, mean)``: ``(site, FitRes)`` of each site that took part,
    and the weighted mean of their vectors (None if none did)."""
    from flwr.app import ConfigRecord
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    class OneRound(Strategy):
        """The chosen sites with their own configs; keeps what SecAgg+ aggregated."""

        def __init__(self):
            self.results, self.failures = [], []

        def configure_fit(self, server_round, parameters, client_manager):
            return [
                (GridClientProxy(order[i], grid, context.run_id), FitIns(parameters, config_of(i)))
                for i in chosen
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

    index_of = {node: i for i, node in enumerate(order)}  # order may change between rounds
    strategy = OneRound()
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: index})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(arrays), keep_input=True
    )
    sampled = len(chosen)  # every sampled site shares its keys with every other; any
    SecAggPlusWorkflow(  # one may drop out (two or more sampled sites are needed)
        num_shares=1.0,
        reconstruction_threshold=max(2, sampled - 1) / max(sampled, 2),
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        max_weight=float(max_weight),
        timeout=timeout,
    )(grid, legacy)
    answered = [(index_of[proxy.node_id], fitres) for proxy, fitres in strategy.results]
    if not strategy.results:
        return answered, None
    return answered, parameters_to_ndarrays(strategy.results[0][1].parameters)[0]


def make_secagg_collect(grid, context, order: list[int], round_config: Callable, max_rows: int):
    """The round loop's ``collect`` over SecAgg+: one ``SecAggPlusWorkflow`` run per round
    for the chosen sites (``order[index]`` is a site's node id; ``round_config(index,
    round_params, round_index)`` its training config). Returns a
    :class:`~pipelines.federated.fedavg.RoundUpdates` that holds only the mean update."""
    import torch

    from pipelines.federated.fedavg import RoundUpdates
    from pipelines.federated.strategies import Rejection

    def collect(global_state, chosen, round_params, round_index) -> RoundUpdates:
        answered, mean = _secagg_round(
            grid,
            context,
            order,
            chosen,
            _to_arrays(global_state),
            lambda i: round_config(i, round_params, round_index),
            max_rows,
            round_params.client_timeout_seconds,
            round_index,
        )
        result = RoundUpdates()
        for index, fitres in answered:
            result.clients.append(index)
            result.sizes.append(int(fitres.num_examples))
            result.losses.append(float(fitres.metrics["loss"]))
        if mean is not None:
            flat = torch.as_tensor(np.asarray(mean, dtype=np.float64))
            result.mean = _in_state_order(flat, global_state)
        done = {index for index, _ in answered}
        for index in chosen:
            if index not in done:
                reason = "left the SecAgg+ protocol (no reply, a failure, or it halted)"
                result.dropped.append(Rejection(index, reason))
        return result

    return collect


def secure_class_statistics(
    grid, context, order: list[int], state, config: dict, max_rows: int, timeout
) -> dict:
    """The summed class statistics of every site, through one SecAgg+ run before round 1:
    each site sends its :func:`statistics_vector` masked, with weight 1, so the server
    learns only their sum (for the class-mean head). ``config``: the sites' common config
    (model config, pixel range). Raises when fewer than two sites took part."""
    scale = float(max(max_rows, 1))
    # the sum of the sites' quantized vectors must stay below the 2**32 modulus: as many
    # levels as that allows (2**28 for up to 15 sites), for a head as exact as in the clear
    levels = min(2**28, 2 ** int(np.log2(2**32 // (len(order) + 1))))
    answered, mean = _secagg_round(
        grid,
        context,
        order,
        list(range(len(order))),
        _to_arrays(state),
        lambda _i: {**config, SECURE_TASK: "statistics", "statistics-scale": scale},
        1.0,
        timeout,
        0,
        clipping_range=STATISTICS_CLIPPING,
        quantization_range=levels,
    )
    if mean is None or len(answered) < 2:
        raise RuntimeError("SecAgg+ class statistics: fewer than two sites took part")
    num_classes = int(state["head.weight"].shape[0])
    return statistics_from_mean(mean, len(answered), num_classes, scale)
