"""The Flower runtime: the same client training and round loop over Flower's deployment engine.

:func:`make_server_app` and :func:`make_client_app` build the ``ServerApp`` and ``ClientApp``
(Flower's Message API) that ``pipelines/federated/flower_app`` exposes to ``flwr run``:

- the **ClientApp** runs at a data site, in a SuperNode. Its node config names the site and
  its data: ``site="<name>" shard="<Parquet shard>"`` (the loopback deployment: a shard that
  partition wrote, already scaled), or ``site="<name>" data="<train>" holdout="<held-out
  rows>" scale="raw"`` (``lepton site join``: the site's own files, scaled here with the
  run's pixel range). On a ``query`` message it checks its data against the run's
  (:mod:`pipelines.federated.sites`) and returns its name and row count and, given a model
  config, the class statistics of its rows (for the class-mean head); on a ``train``
  message it runs :func:`~pipelines.federated.fedavg.train_client` (the one client step
  every runtime shares), or :func:`~pipelines.federated.ssl.train_ssl_client` for a
  ``simclr`` task, and returns its weights, row count and loss; on an ``evaluate``
  message it scores the model on its held-out rows and returns accuracy and row count. Each
  of these is :func:`~pipelines.federated.site_steps.run_step`, run in the ClientApp's own
  process or, when the node config names a ``worker`` socket, in the site's warm worker
  (:mod:`pipelines.federated.site_worker`).
- the **ServerApp** reads the run spec packaged into the app (``run_spec.json``: federate
  params, seed, model config, start weights, the val table), waits for the SuperNodes,
  sets the head from their class statistics, then runs
  :func:`~pipelines.federated.fedavg.run_federation` with a ``collect`` that sends each
  round to the sampled nodes (with ``secure_aggregation``, one that runs a SecAgg+ round:
  :mod:`pipelines.federated.flower_secagg`), so screening, aggregation, DP and the server
  optimizer are the simulation's own code. After the last round each site scores the final
  model on its held-out rows. Each round's history row goes to its output as it ends, and the result
  (history, per-site metrics, final weights) at the end
  (:func:`~pipelines.federated.flower_deploy.report_result`); the stage reads both from
  ``flwr log``. A spec with ``"task": "simclr"`` runs federated SimCLR instead (encoder +
  projection head, no head init, no val, no site scores).

This module imports ``flwr``, which lives in its own environment (``.venv-flower``, see
docs/federated.md): Flower pins protobuf, typer and rich below what the main environment
uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROUND_TIMEOUT_SECONDS = 3600.0
ACCOUNTANT_STATE = "lepton-accountant"  # the ClientApp's context.state record


PACKED_ARRAYS = "safetensors"  # the one array of a packed ArrayRecord


def _state_record(state):
    """A torch state dict as a packed ``ArrayRecord`` (see :func:`_numpy_record`)."""
    return _numpy_record({k: v.detach().cpu().contiguous().numpy() for k, v in state.items()})


def _numpy_record(arrays):
    """NumPy arrays by name as an ``ArrayRecord`` of one array: their safetensors bytes.
    Flower sends every array of a record as its own object, one request each way; one
    array per message keeps a round to a few requests whatever the model's layer count."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from safetensors.numpy import save

    packed = np.frombuffer(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}), np.uint8)
    return ArrayRecord({PACKED_ARRAYS: Array.from_numpy_ndarray(packed)})


def unpack_record(record) -> dict:
    """The NumPy arrays by name of an ``ArrayRecord`` that :func:`_numpy_record` packed."""
    from safetensors.numpy import load

    if PACKED_ARRAYS not in record:  # an empty record
        return {}
    return load(record[PACKED_ARRAYS].numpy().tobytes())


def unpack_state(record) -> dict:
    """The torch state dict of an ``ArrayRecord`` that :func:`_state_record` packed."""
    import torch

    return {k: torch.from_numpy(v) for k, v in unpack_record(record).items()}


def make_client_app():
    """The ClientApp: checks and class statistics (``query``), local training (``train``),
    scores on the site's held-out rows (``evaluate``), each through
    :func:`~pipelines.federated.site_steps.run_step`: in this process, or in the site's warm
    worker when the node config names one (``worker="<socket>"``; then this process needs
    no torch). SecAgg+ rounds run here, inside Flower's ``secaggplus_mod``."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from pipelines.federated.flower_secagg import (
        SECAGG_CONFIG_RECORD,
        SECURE_TASK,
        secure_train,
        secure_when_asked,
    )
    from pipelines.federated.site_steps import (
        ACCOUNTANT,
        ACCOUNTANT_KEY,
        RECORD_STEP,
        accountant_file,
    )

    app = ClientApp()

    def site(context: Context, config) -> Any:
        from pipelines.federated.sites import load_site

        scale = json.loads(str(config["normalization"])) if "normalization" in config else None
        return load_site(dict(context.node_config), scale)

    def step(kind: str, context: Context, config: dict, arrays: dict) -> tuple:
        """Site step ``kind`` (:mod:`pipelines.federated.site_steps`) in the site's warm
        worker when the node config names one, else here."""
        node = dict(context.node_config)
        if "worker" in node:
            from pipelines.federated.site_worker import call

            return call(str(node["worker"]), kind, config, arrays)
        from pipelines.federated.site_steps import run_step

        return run_step(kind, site(context, config), config, arrays)

    def answer(kind: str, msg: Message, context: Context) -> Message:
        config = dict(msg.content["config"])
        record_step = str(config.pop(RECORD_STEP, ""))
        # record-level DP: the site's own accountant, kept in context.state and, where the
        # node config names a state folder, on the site's disk (a resumed run goes on from it)
        saved = accountant_file(dict(context.node_config), str(config.pop(ACCOUNTANT_KEY, "")))
        if record_step:
            kind = record_step
            if ACCOUNTANT_STATE in context.state.config_records:
                config[ACCOUNTANT] = context.state[ACCOUNTANT_STATE][ACCOUNTANT]
            elif saved is not None and saved.exists():
                config[ACCOUNTANT] = saved.read_text()
        arrays = (
            unpack_record(msg.content["arrays"]) if "arrays" in msg.content.array_records else {}
        )
        info, metrics, out = step(kind, context, config, arrays)
        if ACCOUNTANT in info:  # stays at the site, for its next message
            spent = str(info.pop(ACCOUNTANT))
            context.state[ACCOUNTANT_STATE] = ConfigRecord({ACCOUNTANT: spent})
            if saved is not None:  # whole or not at all: a killed site keeps its last state
                from pipelines.io import write_text_atomic

                saved.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(saved, spent)
        content = RecordDict({"info": ConfigRecord(info)})
        if metrics:
            content["metrics"] = MetricRecord(metrics)
        if out:
            content["arrays"] = _numpy_record(out)
        return Message(content=content, reply_to=msg)

    @app.query()
    def statistics(msg: Message, context: Context) -> Message:
        return answer("query", msg, context)

    @app.train(mods=[secure_when_asked])
    def train(msg: Message, context: Context) -> Message:
        if SECAGG_CONFIG_RECORD in msg.content.config_records:  # a SecAgg+ round

            def update(config: dict, parameters: list) -> tuple:
                arrays = {f"p{i:05d}": array for i, array in enumerate(parameters)}
                task = config.pop(SECURE_TASK, "train")  # or "statistics", before round 1
                _, metrics, out = step(f"secure-{task}", context, config, arrays)
                return out["update"], int(metrics["num-examples"]), float(metrics["loss"])

            return secure_train(msg, update)
        return answer("train", msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return answer("evaluate", msg, context)

    return app


REPLY_POLL_SECONDS = 0.05


LAST_PULL_SECONDS = 0.5  # the least a pull may wait for a reply's content


@contextlib.contextmanager
def object_pulls_within(seconds: float | None):
    """Within the block, Flower's pulls of message content (``pull_objects``) in this
    process give up after ``seconds`` (at least :data:`LAST_PULL_SECONDS`; ``None``: as
    set) instead of Flower's time limit. Outside Flower's environment: nothing to bound."""
    try:
        from flwr.supercore.inflatable import inflatable_utils
    except ImportError:
        yield
        return
    defaults = inflatable_utils.pull_objects.__kwdefaults__
    before = defaults["max_time"]
    if seconds is not None:
        bound = max(seconds, LAST_PULL_SECONDS)
        defaults["max_time"] = bound if before is None else min(before, bound)
    try:
        yield
    finally:
        defaults["max_time"] = before


class PollingGrid:
    """Flower's ``Grid`` whose ``send_and_receive`` asks the SuperLink for replies every
    ``poll_seconds`` (Flower's waits 3 s between asks, a floor under every round); everything
    else is the wrapped grid's. Built on the grid's own ``push_messages`` and
    ``pull_messages``."""

    def __init__(self, grid, poll_seconds: float = REPLY_POLL_SECONDS):
        self._grid = grid
        self.poll_seconds = poll_seconds

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:
        """Push ``messages`` and pull their replies until all came or ``timeout`` s passed
        (``None``: wait for all), as ``Grid.send_and_receive`` does.

        A pull fetches each reply's content too, and waits for content still being sent:
        a site killed while it sent its reply left content that never comes. That wait is
        held to the time left (else Flower's, up to hours, or until the SuperLink drops
        the upload, minutes: ``object_pulls_within``), and once the time is up the replies
        that came during the last pull are still taken (one more pull), so one dead site
        neither holds the round past its timeout nor costs the others their updates."""
        waiting = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list = []
        while True:
            left = None if timeout is None else end - time.time()
            with object_pulls_within(left):
                got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or (left is not None and left <= 0):
                break  # all came, or this was the pull after the time was up
            time.sleep(self.poll_seconds)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def wait_for_nodes(grid, count: int, wait_seconds: float) -> list[int]:
    """The ids of the connected SuperNodes once ``count`` are there; raises after
    ``wait_seconds``."""
    started = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() - started > wait_seconds:
            raise RuntimeError(
                f"{len(nodes)} SuperNodes connected after {wait_seconds:g} s, {count} needed "
                "(federation.sites, federation.site_wait_seconds)"
            )
        time.sleep(0.2)
    return nodes


def _replies_or_raise(replies, nodes: list[int], what: str) -> list:
    replies = list(replies)
    failed = [r.error.reason for r in replies if r.has_error()]
    if failed or len(replies) != len(nodes):
        raise RuntimeError(
            f"{what}: {len(replies)} replies from {len(nodes)} SuperNodes; "
            f"errors: {'; '.join(failed) or 'none'}"
        )
    return replies


def load_run_blobs(blobs: dict[str, bytes], folder: Path) -> tuple[dict, Any]:
    """Start weights and the val table (if any) out of the run spec's blobs."""
    from safetensors.torch import load

    from pipelines.io import read_image_table

    state = load(blobs["initial"])
    val = None
    if "val" in blobs:
        (folder / "val.parquet").write_bytes(blobs["val"])
        val = read_image_table(folder / "val.parquet")
    return state, val


def make_server_app(package_dir: Path):
    """The ServerApp of the app in ``package_dir`` (its ``run_spec.json``): class-mean head
    from the nodes, then the shared round loop, then the sites' scores."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from pipelines.federated.flower_deploy import exit_when_orphaned

        exit_when_orphaned()  # before the imports, which take a while on a loaded machine
        from safetensors.torch import save

        from pipelines.config import FederateParams, PretrainParams
        from pipelines.federated.fedavg import (
            RoundUpdates,
            client_seed,
            run_federation,
            with_class_mean_head,
        )
        from pipelines.federated.flower_deploy import (
            RelayedCheckpoint,
            encode_blob,
            read_run_spec,
            report_progress,
            report_result,
        )
        from pipelines.federated.flower_secagg import make_secagg_collect
        from pipelines.federated.flower_site_runtime import shorten_flower_waits
        from pipelines.federated.ssl import ssl_round_params
        from pipelines.federated.strategies import Rejection, flatten_update
        from pipelines.models.encoder import build_contrastive

        shorten_flower_waits(REPLY_POLL_SECONDS)  # its object pulls
        grid = PollingGrid(grid)
        spec, blobs = read_run_spec(package_dir)
        simclr = spec.get("task", "classifier") == "simclr"
        if simclr:
            pretrain = PretrainParams.model_validate(spec["pretrain"])
            params = ssl_round_params(pretrain)
            task_config = {
                "task": "simclr",
                "temperature": pretrain.client_temperature,
                "weight-decay": pretrain.weight_decay,
                "warmup-steps": pretrain.client_warmup_steps,
            }
        else:
            params = FederateParams.model_validate(spec["federate"])
            task_config = {}
        seed, device, config = int(spec["seed"]), str(spec["device"]), spec["model_config"]
        config_json = json.dumps(config)
        site_config = {"normalization": json.dumps(spec["normalization"])}
        with tempfile.TemporaryDirectory() as tmp:
            state, val = load_run_blobs(blobs, Path(tmp))
        nodes = wait_for_nodes(grid, int(spec["num_clients"]), float(spec["site_wait_seconds"]))

        def relayed_checkpoint() -> RelayedCheckpoint | None:
            """The stage's checkpoint as the run spec relays it (None: no checkpoint)."""
            if "checkpoint" not in spec:
                return None
            return RelayedCheckpoint(blobs.get("resume"), spec["checkpoint"]["owner"])

        if not simclr and params.dp.enabled and params.dp.unit == "record":
            from pipelines.federated.flower_record import run_record_on_grid

            timeout = params.client_timeout_seconds or ROUND_TIMEOUT_SECONDS
            model, history, sites = run_record_on_grid(
                grid, spec, params, state, val, nodes, timeout, relayed_checkpoint()
            )
            final = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            report_result(
                {
                    "history": history,
                    "sites": sites,
                    "model_config": model.config,
                    "weights": encode_blob(save(final)),
                }
            )
            return

        # order the nodes by site name (each checks its data against the run's);
        # a classifier's head from their statistics
        query_config = {"expected": json.dumps(spec["expected"]), **site_config}
        secure = not simclr and params.secure_aggregation
        if not simclr and not secure:  # (under SecAgg+ only their masked sum: see below)
            query_config["model-config"] = config_json
        query = [
            Message(
                RecordDict({"arrays": _state_record(state), "config": ConfigRecord(query_config)}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in nodes
        ]
        replies = _replies_or_raise(
            grid.send_and_receive(query, timeout=ROUND_TIMEOUT_SECONDS), nodes, "site check"
        )
        by_site = {str(r.content["info"]["site"]): r for r in replies}
        if len(by_site) != len(replies):
            raise RuntimeError(
                "two SuperNodes gave the same site name: "
                + ", ".join(sorted(str(r.content["info"]["site"]) for r in replies))
            )
        names = sorted(by_site)
        order = [by_site[name].metadata.src_node_id for name in names]
        sites = [
            {
                "site": name,
                "rows": int(by_site[name].content["info"]["rows"]),
                "holdout_rows": int(by_site[name].content["info"]["holdout-rows"]),
            }
            for name in names
        ]
        if not simclr and not secure:
            stats = [unpack_state(by_site[name].content["arrays"]) for name in names]
            state = with_class_mean_head(state, stats)
        elif secure:  # the same head from the sum of the sites' statistics, masked
            from pipelines.federated.flower_secagg import secure_class_statistics

            summed = secure_class_statistics(
                grid,
                context,
                order,
                state,
                {"model-config": config_json, **site_config},
                max(s["rows"] for s in sites),
                params.client_timeout_seconds,
            )
            state = with_class_mean_head(state, [summed])

        def round_config(index: int, round_params, round_index: int) -> dict[str, Any]:
            return {
                "params": round_params.model_dump_json(),
                "seed": client_seed(seed, round_index, index),
                "device": device,
                "model-config": config_json,
                **site_config,
                **task_config,
            }

        strangers: set[int] = set()

        def take_back_rejoined_sites() -> None:
            """A site whose SuperNode restarted has a new node id: ask each new node which
            site it is (and check its data), and send that site's rounds there."""
            new = [n for n in grid.get_node_ids() if n not in order and n not in strangers]
            if not new:
                return
            config = ConfigRecord({"expected": json.dumps(spec["expected"]), **site_config})
            asked = [
                Message(
                    RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY
                )
                for n in new
            ]
            for reply in grid.send_and_receive(asked, timeout=120):
                node = reply.metadata.src_node_id
                name = None if reply.has_error() else str(reply.content["info"]["site"])
                if name not in names:
                    strangers.add(node)  # refused its data, or a site this run did not start with
                    continue
                order[names.index(name)] = node
                log.info("site %s is back (node %d)", name, node)

        def send_round(global_state, chosen, round_params, round_index) -> RoundUpdates:
            messages = [
                Message(
                    RecordDict(
                        {
                            "arrays": _state_record(global_state),
                            "config": ConfigRecord(round_config(index, round_params, round_index)),
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
                    new_state = unpack_state(reply.content["arrays"])
                    result.clients.append(index)
                    result.updates.append(flatten_update(new_state, global_state))
                    result.sizes.append(size)
                    result.losses.append(float(reply.content["metrics"]["loss"]))
            return result

        if secure:
            send_round = make_secagg_collect(
                grid, context, order, round_config, max(s["rows"] for s in sites)
            )

        site_losses: dict[str, float] = {}  # the last round's, for its progress line

        def collect(global_state, chosen, round_params, round_index) -> RoundUpdates:
            take_back_rejoined_sites()
            got = send_round(global_state, chosen, round_params, round_index)
            site_losses.clear()
            site_losses.update(
                {names[i]: loss for i, loss in zip(got.clients, got.losses, strict=True)}
            )
            return got

        model, history = run_federation(
            config,
            state,
            order,
            val,
            params,
            seed,
            device,
            lambda _round, row: report_progress({**row, "site_losses": dict(site_losses)}),
            collect=collect,
            checkpoint=relayed_checkpoint(),
            **({"build": build_contrastive, "score": lambda _model: {}} if simclr else {}),
        )
        final = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if not simclr and any(site["holdout_rows"] for site in sites):
            scores = score_at_sites(grid, order, final, config_json, site_config)
            for entry, score in zip(sites, scores, strict=True):
                entry.update(score)
        report_result(
            {
                "history": history,
                "sites": sites,
                "model_config": model.config,
                "weights": encode_blob(save(final)),
            }
        )

    def score_at_sites(grid, order, state, config_json, site_config) -> list[dict]:
        messages = [
            Message(
                RecordDict(
                    {
                        "arrays": _state_record(state),
                        "config": ConfigRecord({"model-config": config_json, **site_config}),
                    }
                ),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
            )
            for node in order
        ]
        answered = {
            r.metadata.src_node_id: r
            for r in grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_SECONDS)
        }
        scores = []
        for node in order:
            reply = answered.get(node)
            if reply is None or reply.has_error():
                scores.append({"holdout_accuracy": None})
                continue
            metrics = reply.content["metrics"]
            rows = int(metrics["rows"])
            scores.append({"holdout_accuracy": float(metrics["accuracy"]) if rows else None})
        return scores

    return app
