"""The Flower runtime: the same client training and round loop over Flower's deployment engine.

:func:`make_server_app` and :func:`make_client_app` build the ``ServerApp`` and ``ClientApp``
(Flower's Message API) that ``pipelines/federated/flower_app`` exposes to ``flwr run``:

- the **ClientApp** runs at a data site, in a SuperNode started with
  ``--node-config 'client-index=<i> shard="<path to the site's Parquet shard>"'``. On a
  ``query`` message it returns its client index and, given a model config, the class
  statistics of its shard (for the class-mean head); on a ``train`` message it runs
  :func:`~pipelines.federated.fedavg.train_client` (the one client step every runtime
  shares), or :func:`~pipelines.federated.ssl.train_ssl_client` for a ``simclr`` task
  (federated pretraining), and returns its weights, row count and loss;
- the **ServerApp** reads a run spec (JSON, path in the run config key ``spec``: federate
  params, seed, model config, start weights, the val table, the output folder), waits for
  the SuperNodes, sets the head from their class statistics, then runs
  :func:`~pipelines.federated.fedavg.run_federation` with a ``collect`` that sends each
  round to the sampled nodes, so screening, aggregation, DP and the server optimizer are the
  simulation's own code. It appends each round's history row to ``progress.jsonl`` as the
  round ends (the stage logs it to MLflow while the run goes) and writes
  ``model.safetensors``, ``model.json`` and ``history.json`` into the output folder. A
  spec with ``"task": "simclr"`` runs federated SimCLR instead (encoder + projection head,
  no head init, no val).

This module imports ``flwr``, which lives in its own environment (``.venv-flower``, see
docs/federated.md): Flower pins protobuf, typer and rich below what the main environment
uses.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NODE_WAIT_SECONDS = 300.0
ROUND_TIMEOUT_SECONDS = 3600.0


def _state_record(state):
    from flwr.app import ArrayRecord

    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def make_client_app():
    """The ClientApp: class statistics (``query``) and local training (``train``)."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from pipelines.config import FederateParams
    from pipelines.federated.fedavg import client_class_statistics, train_client
    from pipelines.federated.sites import check_site_data
    from pipelines.federated.ssl import train_ssl_client
    from pipelines.io import read_image_table

    app = ClientApp()

    def shard(context: Context):
        return int(context.node_config["client-index"]), read_image_table(
            str(context.node_config["shard"])
        )

    @app.query()
    def statistics(msg: Message, context: Context) -> Message:
        index, table = shard(context)
        config = msg.content["config"]
        if "expected" in config:  # refuse a shard unlike the run's data before any training
            check_site_data(
                table, json.loads(str(config["expected"])), str(context.node_config["shard"])
            )
        if "model-config" not in config:  # only which client this node is
            info = RecordDict({"info": ConfigRecord({"client-index": index})})
            return Message(content=info, reply_to=msg)
        state = msg.content["arrays"].to_torch_state_dict()
        stats = client_class_statistics(
            state, table, "cpu", model_config=json.loads(str(config["model-config"]))
        )
        content = RecordDict(
            {
                "arrays": _state_record(stats),
                "info": ConfigRecord({"client-index": index}),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        index, table = shard(context)
        config = msg.content["config"]
        params = FederateParams.model_validate_json(str(config["params"]))
        state = msg.content["arrays"].to_torch_state_dict()
        step = train_client
        if str(config.get("task", "classifier")) == "simclr":
            step = functools.partial(
                train_ssl_client,
                temperature=float(config["temperature"]),
                weight_decay=float(config["weight-decay"]),
            )
        new_state, size, loss = step(
            state,
            table,
            params,
            int(config["seed"]),
            str(config["device"]),
            model_config=json.loads(str(config["model-config"])),
        )
        content = RecordDict(
            {
                "arrays": _state_record(new_state),
                "metrics": MetricRecord({"num-examples": int(size), "loss": float(loss)}),
                "info": ConfigRecord({"client-index": index}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _wait_for_nodes(grid, count: int) -> list[int]:
    started = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() - started > NODE_WAIT_SECONDS:
            raise RuntimeError(
                f"{len(nodes)} SuperNodes connected after {NODE_WAIT_SECONDS} s, {count} needed"
            )
        time.sleep(1.0)
    return nodes


def make_server_app():
    """The ServerApp: class-mean head from the nodes, then the shared round loop."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.serverapp import Grid, ServerApp

    from pipelines.config import FederateParams, PretrainParams
    from pipelines.federated.fedavg import (
        RoundUpdates,
        client_seed,
        run_federation,
        with_class_mean_head,
    )
    from pipelines.federated.flower_deploy import PROGRESS_FILE
    from pipelines.federated.ssl import ssl_round_params
    from pipelines.federated.strategies import Rejection, flatten_update
    from pipelines.io import read_image_table, save_weights, write_json
    from pipelines.models.encoder import build_contrastive

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        spec = json.loads(Path(str(context.run_config["spec"])).read_text())
        simclr = spec.get("task", "classifier") == "simclr"
        if simclr:
            pretrain = PretrainParams.model_validate(spec["pretrain"])
            params = ssl_round_params(pretrain)
            task_config = {
                "task": "simclr",
                "temperature": pretrain.client_temperature,
                "weight-decay": pretrain.weight_decay,
            }
        else:
            params = FederateParams.model_validate(spec["federate"])
            task_config = {}
        seed, device, config = int(spec["seed"]), str(spec["device"]), spec["model_config"]
        config_json = json.dumps(config)
        from safetensors.torch import load_file

        state = load_file(spec["initial"])
        val = None if simclr else read_image_table(spec["val"])
        nodes = _wait_for_nodes(grid, int(spec["num_clients"]))

        # order the nodes by their client index (each checks its data against the run's);
        # a classifier's head from their statistics
        query_config = {"expected": json.dumps(spec["expected"])} if "expected" in spec else {}
        if not simclr:
            query_config["model-config"] = config_json
        query = [
            Message(
                RecordDict(
                    {
                        "arrays": _state_record(state),
                        "config": ConfigRecord(query_config),
                    }
                ),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in nodes
        ]
        replies = list(grid.send_and_receive(query, timeout=ROUND_TIMEOUT_SECONDS))
        failed = [r.error.reason for r in replies if r.has_error()]
        if failed or len(replies) != len(nodes):
            raise RuntimeError(
                f"node query: {len(replies)} replies from {len(nodes)} SuperNodes; "
                f"errors: {'; '.join(failed) or 'none'}"
            )
        by_index = {int(r.content["info"]["client-index"]): r for r in replies}
        order = [by_index[i].metadata.src_node_id for i in sorted(by_index)]
        if not simclr:
            stats = [by_index[i].content["arrays"].to_torch_state_dict() for i in sorted(by_index)]
            state = with_class_mean_head(state, stats)

        def collect(global_state, chosen, round_params, round_index) -> RoundUpdates:
            messages = [
                Message(
                    RecordDict(
                        {
                            "arrays": _state_record(global_state),
                            "config": ConfigRecord(
                                {
                                    "params": round_params.model_dump_json(),
                                    "seed": client_seed(seed, round_index, index),
                                    "device": device,
                                    "model-config": config_json,
                                    **task_config,
                                }
                            ),
                        }
                    ),
                    dst_node_id=order[index],
                    message_type=MessageType.TRAIN,
                    group_id=str(round_index),
                )
                for index in chosen
            ]
            timeout = params.client_timeout_seconds or ROUND_TIMEOUT_SECONDS
            replies = grid.send_and_receive(messages, timeout=timeout)
            answered = {r.metadata.src_node_id: r for r in replies}
            result = RoundUpdates()
            for index in chosen:
                reply = answered.get(order[index])
                if reply is None:
                    result.dropped.append(Rejection(index, f"no reply within {timeout:g} s"))
                elif reply.has_error():
                    result.dropped.append(Rejection(index, f"failed: {reply.error.reason}"))
                else:
                    size = int(reply.content["metrics"]["num-examples"])
                    if size == 0:
                        continue
                    new_state = reply.content["arrays"].to_torch_state_dict()
                    result.clients.append(index)
                    result.updates.append(flatten_update(new_state, global_state))
                    result.sizes.append(size)
                    result.losses.append(float(reply.content["metrics"]["loss"]))
            return result

        out = Path(spec["out"])
        out.mkdir(parents=True, exist_ok=True)

        def report(round_index: int, row: dict[str, Any]) -> None:
            log.info("round %d: %s", round_index, row)
            with (out / PROGRESS_FILE).open("a") as progress:  # read by the stage as it goes
                progress.write(json.dumps(row) + "\n")

        model, history = run_federation(
            config,
            state,
            order,
            val,
            params,
            seed,
            device,
            report,
            collect=collect,
            **({"build": build_contrastive, "score": lambda _model: {}} if simclr else {}),
        )
        save_weights(model, out, model.config, name="model")
        write_json(out / "history.json", history)

    return app
