"""Secure aggregation on the Flower runtime: Flower's SecAgg+ around the same client step.

In flwr 1.41 SecAgg+ exists only in Flower's legacy workflow: the ServerApp runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` over a legacy ``FedAvg``
strategy, and the ClientApp is a ``NumPyClient`` wrapped in ``secaggplus_mod``, which masks
the weights before they leave the SuperNode. The server learns only the sample-weighted
mean of the clients' weights, so nothing here screens or robustly aggregates individual
updates (``federate.secure_aggregation`` requires ``aggregator: mean``, no update-norm
bound and no DP). The client step is still :func:`~pipelines.federated.fedavg.train_client`
with the same seeds and learning-rate schedule; the class-mean head, which needs per-client
statistics, is not used: the head starts from its seeded random init.

SecAgg+ clips every value to ``±CLIPPING_RANGE`` and quantizes it before masking; integer
buffers (BatchNorm's counters) are not aggregated: the server keeps the start model's.
The apps are shipped by ``pipelines/federated/flower_app_secagg``; this module imports
``flwr`` (the Flower environment, ``.venv-flower``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

CLIPPING_RANGE = 8.0


def _to_state(arrays, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NumPy arrays in ``template``'s key order → a state dict with its dtypes."""
    return {
        key: torch.as_tensor(np.asarray(array)).to(value.dtype).reshape(value.shape)
        for (key, value), array in zip(template.items(), arrays, strict=True)
    }


def _to_arrays(state: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return [value.detach().cpu().numpy() for value in state.values()]


def make_secagg_client_app():
    """ClientApp: ``train_client`` inside a NumPyClient, masked by ``secaggplus_mod``."""
    from flwr.app import Context
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    from pipelines.config import FederateParams
    from pipelines.federated.fedavg import client_seed, train_client
    from pipelines.federated.sites import load_site
    from pipelines.models.encoder import build_classifier

    class SiteClient(NumPyClient):
        def __init__(self, index: int, node_config: dict):
            self.index, self.table = index, load_site(node_config, None).train

        def fit(self, parameters, config):
            model_config = json.loads(str(config["model-config"]))
            template = build_classifier(model_config).state_dict()
            params = FederateParams.model_validate_json(str(config["params"]))
            seed = client_seed(int(config["seed"]), int(config["round"]), self.index)
            new_state, size, loss = train_client(
                _to_state(parameters, template),
                self.table,
                params,
                seed,
                str(config["device"]),
                model_config=model_config,
            )
            return _to_arrays(new_state), int(size), {"loss": float(loss)}

    def client_fn(context: Context):
        node = context.node_config
        return SiteClient(int(node["client-index"]), dict(node)).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def make_secagg_server_app(package_dir: Path):
    """ServerApp of the app in ``package_dir`` (its ``run_spec.json``): legacy FedAvg under
    ``SecAggPlusWorkflow``; val scored after each round, reported as the plain runtime's."""
    from flwr.app import Context
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import Grid, ServerApp
    from safetensors.torch import save

    from pipelines.config import FederateParams
    from pipelines.federated.fedavg import (
        clients_per_round,
        evaluate_accuracy,
        round_learning_rate,
    )
    from pipelines.federated.flower import load_run_blobs
    from pipelines.federated.flower_deploy import (
        encode_blob,
        read_run_spec,
        report_progress,
        report_result,
    )
    from pipelines.models.encoder import build_classifier

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        import tempfile

        spec, blobs = read_run_spec(package_dir)
        params = FederateParams.model_validate(spec["federate"])
        config = spec["model_config"]
        model = build_classifier(config)
        with tempfile.TemporaryDirectory() as tmp:
            loaded, val = load_run_blobs(blobs, Path(tmp))
        start = {key: loaded[key] for key in model.state_dict()}  # safetensors sorts keys
        clients = int(spec["num_clients"])
        history: list[dict] = []
        fit_summary: dict = {}

        def summarize_fit(results: list[tuple[int, dict]]) -> dict:
            """Loss and counts of a round (metrics travel in clear; weights are masked)."""
            rows = sum(n for n, _ in results)
            fit_summary.update(
                accepted=len(results),
                samples=rows * params.local_epochs,
                train_loss=sum(n * float(m["loss"]) for n, m in results) / max(rows, 1),
            )
            return {}

        def fit_config(round_index: int) -> dict:
            round_params = params.model_copy(
                update={"learning_rate": round_learning_rate(params, round_index)}
            )
            return {
                "params": round_params.model_dump_json(),
                "seed": int(spec["seed"]),
                "round": round_index,
                "device": str(spec["device"]),
                "model-config": json.dumps(config),
            }

        def evaluate(round_index: int, arrays, _config):
            state = _to_state(arrays, start)
            for key, value in start.items():  # counters are not aggregated
                if not value.is_floating_point():
                    state[key] = value
            model.load_state_dict(state)
            if round_index > 0:
                if not fit_summary:
                    raise RuntimeError(
                        f"secure aggregation halted in round {round_index}: too few clients "
                        "finished the SecAgg+ protocol (see the SuperNodes' logs)"
                    )
                accuracy = evaluate_accuracy(model, val, "cpu")
                history.append(
                    {
                        "round": round_index,
                        "val_accuracy": accuracy,
                        "clients": sampled,
                        "rejected": 0,
                        "dropped": sampled - int(fit_summary.get("accepted", sampled)),
                        **fit_summary,
                    }
                )
                report_progress(history[-1])
                fit_summary.clear()
            return 0.0, {}

        sampled = clients_per_round(clients, params.client_fraction)
        strategy = FedAvg(
            fraction_fit=params.client_fraction,
            fraction_evaluate=0.0,
            min_fit_clients=sampled,
            min_evaluate_clients=0,
            min_available_clients=clients,
            evaluate_fn=evaluate,
            on_fit_config_fn=fit_config,
            fit_metrics_aggregation_fn=summarize_fit,
            initial_parameters=ndarrays_to_parameters(_to_arrays(start)),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=params.rounds), strategy=strategy
        )
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=max(3, sampled),
                reconstruction_threshold=max(2, sampled - 1),
                clipping_range=CLIPPING_RANGE,
            )
        )
        workflow(grid, legacy)
        final = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        report_result(
            {
                "history": history,
                "sites": [],
                "model_config": model.config,
                "weights": encode_blob(save(final)),
            }
        )

    return app
