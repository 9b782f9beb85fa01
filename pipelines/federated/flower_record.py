"""Record-level DP on Flower: the ServerApp's side of ``federate.dp.unit: record``.

The round loop is the simulation's own
(:func:`~pipelines.federated.record_federation.run_record_rounds`); here the clients are
SuperNodes. Each site keeps its accountant in its ClientApp's ``context.state`` for the
whole run (:mod:`pipelines.federated.flower`) and takes its steps in
:func:`~pipelines.federated.site_steps.record_count` and
:func:`~pipelines.federated.site_steps.record_train`. What a site sends back: its name; once,
its noisy row count; each round it is sampled in, its head after the round's DP-SGD steps
(on its features under the server's public feature map, sent with the head); and its ``ε``
so far. On a remote federation each site draws its sampling and noise from its
own entropy; on a loopback deployment they come from the run's seed, as in the simulation,
so both runtimes give the same rounds.

Runs in the ServerApp (``.venv-flower``); ``flwr`` is imported inside functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from typing import Any

import numpy as np
import torch

from pipelines.config import FederateParams
from pipelines.federated.feature_projection import FeatureProjection
from pipelines.federated.record_dp import RecordDPSettings
from pipelines.federated.site_steps import ACCOUNTANT_KEY, NAME_ONLY, PRIVATE_HEAD, RECORD_STEP

log = logging.getLogger(__name__)

NOISE_SEED = "noise-seed"


class GridRecordSites:
    """The SuperNodes of a record-level run, as
    :func:`~pipelines.federated.record_federation.run_record_rounds` sees its clients.

    On creation each node checks its data against the run's and gives its site name only
    (a ``query`` with ``name-only``); the nodes are ordered by name. ``seeded``: send the
    run's noise seeds (a loopback deployment, whose rows are in the workspace anyway).
    """

    def __init__(
        self,
        grid,
        nodes: list[int],
        spec: dict[str, Any],
        params: FederateParams,
        state: dict[str, torch.Tensor],
        timeout: float,
        seeded: bool,
    ):
        self.grid, self.params, self.timeout = grid, params, timeout
        self.seed, self.seeded = int(spec["seed"]), seeded
        self.model_config = json.dumps(spec["model_config"])
        self.site_config = {"normalization": json.dumps(spec["normalization"])}
        self.start = {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}
        check = {NAME_ONLY: 1, "expected": json.dumps(spec["expected"]), **self.site_config}
        replies = self._send(nodes, [check] * len(nodes), None, "QUERY", "site check")
        by_site = {str(r.content["info"]["site"]): r for r in replies}
        if len(by_site) != len(replies):
            raise RuntimeError(
                "two SuperNodes gave the same site name: "
                + ", ".join(sorted(str(r.content["info"]["site"]) for r in replies))
            )
        self.names = sorted(by_site)
        self.order = [by_site[name].metadata.src_node_id for name in self.names]
        self._epsilon = [0.0] * len(self.names)
        self.projection: dict[str, np.ndarray] = {}
        # names this run's accountants at the sites that keep them on disk (a resumed run
        # sends the same key: each site goes on from what it has spent, never less)
        self.key = secrets.token_hex(16)

    def accountant_states(self) -> dict[str, Any]:
        """What a checkpoint keeps of the sites' accountants: the run's accountant key and
        each site's ``ε`` so far (the accountants themselves stay at the sites)."""
        return {"key": self.key, "epsilon": list(self._epsilon)}

    def restore_accountants(self, states: dict[str, Any]) -> None:
        """Resume with the key and ``ε`` of :meth:`accountant_states`: each site reloads
        its accountant from its own disk (it refuses the round if it has none)."""
        self.key = str(states["key"])
        self._epsilon = [float(e) for e in states["epsilon"]]

    def _send(self, nodes, configs, arrays, kind: str, what: str, group: str = "") -> list:
        """One message per node (``configs[i]`` to ``nodes[i]``); the replies, or raises
        naming the failures."""
        from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

        from pipelines.federated.flower import _numpy_record, _replies_or_raise

        messages = []
        for node, config in zip(nodes, configs, strict=True):
            content = RecordDict({"config": ConfigRecord(config)})
            if arrays is not None:
                content["arrays"] = _numpy_record(arrays[node]) if arrays else ArrayRecord()
            messages.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=getattr(MessageType, kind),
                    group_id=group,
                )
            )
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        return _replies_or_raise(replies, list(nodes), what)

    def _seed(self, round_index: int, index: int, offset: int = 0) -> dict[str, int]:
        from pipelines.federated.fedavg import client_seed

        if not self.seeded:
            return {}
        return {NOISE_SEED: client_seed(self.seed, round_index, index) + offset}

    def use_projection(self, projection: FeatureProjection) -> None:
        """Send the server's public feature map with every round's head."""
        self.projection = projection.to_arrays()

    def release_row_counts(self) -> list[float]:
        """Each site's noisy row count (``record-count``, spent in its accountant)."""
        dp = self.params.dp
        configs = [
            {
                RECORD_STEP: "record-count",
                ACCOUNTANT_KEY: self.key,
                "count-noise": dp.count_noise_multiplier,
                "delta": dp.delta,
                "accountant-kind": dp.accountant,
                **self.site_config,
                **self._seed(0, i, offset=1),  # the simulation's count stream
            }
            for i in range(len(self.order))
        ]
        replies = self._send(self.order, configs, None, "QUERY", "noisy row counts")
        metrics = [r.content["metrics"] for r in replies]
        by_node = {r.metadata.src_node_id: m for r, m in zip(replies, metrics, strict=True)}
        self._epsilon = [float(by_node[node]["epsilon"]) for node in self.order]
        return [float(by_node[node]["rows-released"]) for node in self.order]

    def train(
        self,
        chosen: list[int],
        weight: torch.Tensor,
        bias: torch.Tensor,
        settings: RecordDPSettings,
        round_index: int,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The heads of the ``chosen`` sites after this round's DP-SGD steps at each."""
        from pipelines.federated.flower import unpack_record

        dp = self.params.dp
        arrays = {
            **self.start,
            **self.projection,
            PRIVATE_HEAD[0]: weight.numpy(),
            PRIVATE_HEAD[1]: bias.numpy(),
        }
        nodes = [self.order[i] for i in chosen]
        configs = [
            {
                RECORD_STEP: "record-train",
                ACCOUNTANT_KEY: self.key,
                "settings": json.dumps(dataclasses.asdict(settings)),
                "model-config": self.model_config,
                "delta": dp.delta,
                "accountant-kind": dp.accountant,
                **self.site_config,
                **self._seed(round_index, i),
            }
            for i in chosen
        ]
        replies = self._send(
            nodes,
            configs,
            dict.fromkeys(nodes, arrays),
            "TRAIN",
            f"round {round_index}",
            str(round_index),
        )
        by_node = {r.metadata.src_node_id: r for r in replies}
        heads = []
        for i, node in zip(chosen, nodes, strict=True):
            reply = by_node[node]
            self._epsilon[i] = float(reply.content["metrics"]["epsilon"])
            out = unpack_record(reply.content["arrays"])
            heads.append(
                tuple(
                    torch.from_numpy(np.array(out[key], dtype=np.float64)) for key in PRIVATE_HEAD
                )
            )
        return heads

    def epsilons(self) -> list[float]:
        """Each site's ``ε`` so far, as its own accountant reported it."""
        return list(self._epsilon)


def run_record_on_grid(
    grid, spec, params: FederateParams, state, val, nodes, timeout, checkpoint=None
):
    """The whole record-level run from the ServerApp: ``(model, history, sites)``, with
    ``sites`` each site's name, noisy row count and ``ε`` (no true count, no site score:
    the held-out rows are private too). With a ``checkpoint`` (the stage's, relayed) every
    round is saved and a saved run resumes after its last round; the sites reload their
    accountants from their own disks (node config ``state``)."""
    from pipelines.federated.fedavg import client_model
    from pipelines.federated.flower_deploy import report_progress
    from pipelines.federated.record_federation import (
        classifier_with_head,
        run_record_rounds,
        val_features_and_labels,
    )

    encoder = client_model(spec["model_config"], state).encoder.eval()
    sites = GridRecordSites(
        grid, nodes, spec, params, state, timeout, seeded=not spec.get("remote", False)
    )
    val_features, val_labels = val_features_and_labels(encoder, val)
    run = run_record_rounds(
        sites,
        val_features,
        val_labels,
        int(val.num_classes),
        params,
        int(spec["seed"]),
        lambda _round, row: report_progress(row),
        checkpoint,
    )
    model = classifier_with_head(encoder, run, int(spec["seed"]))
    sites_out = [{**entry, "rows": None, "holdout_rows": 0} for entry in run.released]
    return model, run.history, sites_out
