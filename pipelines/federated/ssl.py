"""Federated self-supervised pretraining: SimCLR at each client, FedAvg of the weights.

``pretrain.mode: federated``. No image leaves a client: each one trains the encoder and
its projection head with NT-Xent on two augmented views of its own rows
(:func:`train_ssl_client`, labels unused) and sends back the new weights; the server
averages them weighted by rows, as FedAvg does for the classifier. The round loop is the
federate stage's (:func:`pipelines.federated.fedavg.run_federation`: seeded client
sampling, dropped and screened clients, the cosine client learning rate over the rounds),
with ``pretrain.rounds``, ``pretrain.local_epochs``, ``pretrain.client_batch_size`` and
``pretrain.learning_rate``; NT-Xent negatives come from the client's own batch, at
``pretrain.client_temperature``. Each client fit ramps the round's rate up over its first
``pretrain.client_warmup_steps`` steps: its AdamW starts afresh every round, and full-rate
first steps from fresh moments pulled the averaged encoder's kNN probe below that of the
random encoder it started from in the first rounds (docs/benchmarks.md). The
encoder is unaffected by averaging artefacts of batch statistics: it uses GroupNorm.

:func:`pretrain_federated` runs the clients in this process; :func:`pretrain_federated_on_flower`
runs the same rounds on Flower's deployment engine (``pretrain.runtime: flower``; the
ClientApp and ServerApp of :mod:`pipelines.federated.flower` with a ``simclr`` task).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.config import FederateParams, PretrainParams
from pipelines.io import ImageTable, TableStream, table_rows
from pipelines.models.encoder import (
    ContrastiveModel,
    Encoder,
    build_contrastive,
    build_encoder,
    encoder_config_for,
)

if TYPE_CHECKING:
    from pipelines.checkpoints import Checkpoint

log = logging.getLogger(__name__)


def ssl_round_params(p: PretrainParams) -> FederateParams:
    """The round-loop settings of federated SimCLR: plain FedAvg (mean, every client every
    round) at the pretrain section's rounds, local epochs, client batch size and rate."""
    return FederateParams(
        rounds=p.rounds,
        local_epochs=p.local_epochs,
        batch_size=p.client_batch_size,
        learning_rate=p.learning_rate,
    )


def train_ssl_client(
    global_state: Mapping[str, torch.Tensor],
    client_table: ImageTable | TableStream,
    params: FederateParams,
    seed: int,
    device: str = "auto",
    *,
    model_config: dict[str, Any],
    temperature: float,
    weight_decay: float,
    warmup_steps: int = 0,
) -> tuple[dict[str, torch.Tensor], int, float]:
    """One client's SimCLR update: a Lightning fit of encoder + head on its own images.

    ``params.local_epochs`` epochs of AdamW at ``params.learning_rate`` (the round's rate,
    reached by a linear ramp over the first ``warmup_steps`` optimizer steps) on batches of
    ``params.batch_size`` of the client's rows (at most its row count: NT-Xent needs a batch
    to contrast). Returns ``(state on CPU, rows, mean NT-Xent of the last local epoch)``;
    an empty shard returns the global state, 0 rows and NaN.
    """
    from pipelines.federated.fedavg import client_loader, cpu_copy
    from pipelines.models.systems import SimCLRSystem, make_trainer

    rows = table_rows(client_table)
    if rows == 0:
        return cpu_copy(global_state), 0, math.nan
    model = build_contrastive(model_config)
    model.load_state_dict(global_state)
    system = SimCLRSystem(
        model.encoder,
        model.head,
        temperature=temperature,
        learning_rate=params.learning_rate,
        weight_decay=weight_decay,
        seed=seed,
        cosine_schedule=False,
        warmup_steps=warmup_steps,
    )
    batch_size = max(2, min(params.batch_size, rows))
    make_trainer(params.local_epochs, device).fit(
        system, client_loader(client_table, batch_size, seed)
    )
    return cpu_copy(model.state_dict()), rows, system.history[-1]


def start_model(image_shape: tuple[int, int], channels: int, p: PretrainParams, seed: int):
    """The seeded start of federated SimCLR: a fresh encoder + projection head."""
    from pipelines.models.seeding import seed_everything

    seed_everything(seed)
    encoder = build_encoder(
        encoder_config_for(image_shape, channels, p.embedding_dim, p.colour_input)
    )
    return ContrastiveModel(encoder, p.projection_dim)


def pretrain_federated(
    clients: list[ImageTable | TableStream],
    p: PretrainParams,
    seed: int,
    device: str = "auto",
    on_round: Callable[[int, float], None] | None = None,
    checkpoint: Checkpoint | None = None,
    watch: Callable[[ContrastiveModel], None] | None = None,
) -> tuple[Encoder, list[float]]:
    """Federated SimCLR over ``clients``; returns ``(encoder on CPU in eval mode, mean client
    NT-Xent per round)``. ``on_round(round, loss)`` is called after each round, and
    ``watch(model)`` with the averaged model (benchmarks probe it as the rounds go). With a
    ``checkpoint`` each round is saved and a saved run resumes after its last round, to the
    same weights (:func:`~pipelines.federated.fedavg.run_federation`)."""
    from pipelines.federated.fedavg import run_federation

    if not clients:
        raise ValueError("federated pretraining needs at least one client")
    first = clients[0].layout if isinstance(clients[0], TableStream) else clients[0]
    model = start_model(first.image_shape, first.channels, p, seed)
    trainer = functools.partial(
        train_ssl_client,
        temperature=p.client_temperature,
        weight_decay=p.weight_decay,
        warmup_steps=p.client_warmup_steps,
    )

    def report(round_index: int, row: dict[str, float]) -> None:
        if on_round is not None:
            on_round(round_index, row["train_loss"])

    def watched(model: ContrastiveModel) -> dict[str, float]:
        if watch is not None:
            watch(model)
        return {}

    trained, history = run_federation(
        model.config,
        model.state_dict(),
        clients,
        None,
        ssl_round_params(p),
        seed,
        device,
        report,
        trainer=trainer,
        build=build_contrastive,
        score=watched,
        checkpoint=checkpoint,
    )
    return trained.encoder.cpu().eval(), [row["train_loss"] for row in history]


def pretrain_federated_on_flower(
    shards: list[Path],
    p: PretrainParams,
    federation,
    expected: dict[str, Any],
    normalization: dict[str, float],
    seed: int,
    device: str,
    work_dir: Path,
    on_round: Callable[[int, float], None] | None = None,
    checkpoint: Checkpoint | None = None,
) -> tuple[Encoder, list[float]]:
    """:func:`pretrain_federated` on Flower's deployment engine: a loopback deployment over
    ``shards`` (one SuperNode per shard, each reading only its own), or the remote sites of
    ``federation`` (their own files, scaled by ``normalization``); returns ``(encoder, mean
    client NT-Xent per round)`` as the ServerApp reported them. Each SuperNode refuses data
    unlike ``expected`` (:mod:`pipelines.federated.sites`). ``on_round(round, loss)`` is
    called as each round ends on the server (read from ``flwr log`` while the run goes).
    With a ``checkpoint`` the rounds are saved into it and a saved run resumes after its
    last round (:func:`~pipelines.federated.flower_deploy.run_federated_job`)."""
    from pipelines.federated.flower_deploy import APP_DIR, run_federated_job, weights_blob
    from pipelines.io import load_weights

    model = start_model(tuple(expected["image_shape"]), expected["channels"], p, seed)
    spec = {
        "task": "simclr",
        "pretrain": p.model_dump(mode="json"),
        "seed": seed,
        "device": device,
        "model_config": model.config,
        "expected": expected,
        "normalization": normalization,
    }
    blobs = {"initial": weights_blob(model)}
    result = run_federated_job(
        federation,
        shards,
        APP_DIR,
        spec,
        blobs,
        work_dir,
        lambda row: on_round(int(row["round"]), row["train_loss"]) if on_round else None,
        checkpoint=checkpoint,
    )
    state, config = load_weights(work_dir / "out", "model")
    trained = build_contrastive(config)
    trained.load_state_dict(state)
    return trained.encoder.eval(), [row["train_loss"] for row in result["history"]]
