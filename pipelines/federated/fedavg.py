"""Federated rounds (FedAvg, FedProx, FedAdam, robust aggregators, DP), simulated in one process.

:func:`train_client` is the one client step (a Lightning fit on the client's shard); it is
shared by every runtime: this in-process loop and the Flower ClientApp.
:func:`run_federation` is the round loop; the server side (screening, aggregation, server
optimizer) lives in :mod:`pipelines.federated.strategies`, DP in
:mod:`pipelines.federated.privacy`.

Before the first round the new linear head can be set from federated class means of the
pretrained features (FedNCM, Legate et al., 2023): each client sends per-class sums of its
unit-normalised embeddings and class counts (:func:`client_class_statistics`), the server
turns them into a nearest-class-mean head (:func:`class_mean_head`). The model then starts
from the probe's accuracy instead of a random head, which non-IID clients otherwise pull
apart in the first rounds.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.config import FederateParams
from pipelines.errors import LeptonError
from pipelines.federated.privacy import epsilon_after, private_mean, rounds_within
from pipelines.federated.strategies import (
    AGGREGATORS,
    Rejection,
    ServerOptimizer,
    apply_update,
    flatten_update,
    min_updates_for,
    screen_updates,
)
from pipelines.io import ImageTable, TableStream, batches_with_labels, table_rows
from pipelines.models.encoder import Classifier, build_classifier, to_tensor

if TYPE_CHECKING:
    from pipelines.checkpoints import Checkpoint

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
RoundHook = Callable[[int, dict[str, float]], None]

# Client learning rate follows a cosine from federate.learning_rate down to this fraction of
# it over the rounds: late rounds then move the global model less, which damps the
# round-to-round swings that non-IID clients cause (digits, Dirichlet 0.5, 12 rounds, three
# seeds: test accuracy 0.93-0.95 with a constant rate, 0.96-0.97 with the decay).
FINAL_LR_FRACTION = 0.1

# Logit scale of the class-mean head (see class_mean_head). Larger scales let the first local
# steps overfit the clients' skewed labels (tried 2, 5, 10, 20 on digits).
HEAD_INIT_SCALE = 5.0


def cpu_copy(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A detached CPU copy of a state dict (what a client step returns)."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def client_seed(seed: int, round_index: int, client_index: int) -> int:
    """A seed for one client in one round, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, round_index, client_index]).generate_state(1)[0])


@functools.lru_cache(maxsize=2)
def _client_model_for(config_json: str) -> Classifier:
    return build_classifier(json.loads(config_json))


def client_model(model_config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> Classifier:
    """A classifier of ``model_config`` holding ``state``, in training mode.

    One module per config is kept and reloaded: building it (random initialisation the state
    overwrites) cost more than a fifth of a small client's Lightning overhead. Client fits run
    one after another in a process, and each copies its result out before the next starts.
    """
    model = _client_model_for(json.dumps(model_config, sort_keys=True))
    model.load_state_dict(state)
    return model.train()


def client_loader(client_table: ImageTable | TableStream, batch_size: int, seed: int):
    """Shuffled ``(images, labels)`` batches of a client's rows: from memory, or read from
    disk chunk by chunk for a :class:`~pipelines.io.TableStream` (shards over
    ``common.memory_budget_mb``, :class:`~pipelines.models.streaming.StreamingImages`)."""
    from torch.utils.data import DataLoader

    from pipelines.models.streaming import StreamingImages
    from pipelines.models.systems import batch_loader

    if isinstance(client_table, TableStream):
        dataset = StreamingImages(client_table, batch_size, seed, with_labels=True)
        return DataLoader(dataset, batch_size=None)
    return batch_loader(
        to_tensor(client_table.images),
        torch.from_numpy(np.array(client_table.labels, dtype=np.int64)),  # a writable copy
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
    )


def local_epochs_for(rows: int, params: FederateParams) -> int:
    """Epochs a client with ``rows`` rows trains in one round: ``params.local_epochs``, or
    more when its shard is so small that those would be fewer than ``params.min_local_steps``
    optimizer steps (batches of ``params.batch_size``). With few labeled rows per client,
    two epochs are a handful of steps and the model is left under-trained
    (docs/benchmarks.md, few labels)."""
    batches = max(1, math.ceil(rows / params.batch_size))
    return max(params.local_epochs, math.ceil(params.min_local_steps / batches))


def train_client(
    global_state: Mapping[str, torch.Tensor],
    client_table: ImageTable | TableStream,
    params: FederateParams,
    seed: int,
    device: str = "auto",
    *,
    model_config: dict[str, Any],
) -> tuple[StateDict, int, float]:
    """One client's local update: a Lightning fit of the global model on its shard.

    Builds the classifier from ``model_config``, loads ``global_state``, trains it for
    :func:`local_epochs_for` epochs (``params.local_epochs``, more on a tiny shard; Adam,
    ``params.learning_rate``, batches of ``params.batch_size`` shuffled with ``seed``) and
    returns ``(state on CPU, number of samples, mean training loss of the last local
    epoch)``. An empty shard returns the global state unchanged, 0 samples and a NaN loss.
    A :class:`~pipelines.io.TableStream` is read from disk in chunks each epoch
    (:func:`client_loader`).
    """
    from pipelines.models.augment import FINE_TUNE_AUGMENT
    from pipelines.models.systems import ClassifierSystem, make_trainer

    rows = table_rows(client_table)
    if rows == 0:
        return cpu_copy(global_state), 0, math.nan
    model = client_model(model_config, global_state)
    mu = params.proximal_mu if params.strategy == "fedprox" else 0.0
    system = ClassifierSystem(
        model,
        learning_rate=params.learning_rate,
        proximal_mu=mu,
        augment_config=FINE_TUNE_AUGMENT if params.augment else None,
        seed=seed,
    )
    loader = client_loader(client_table, params.batch_size, seed)
    trainer = make_trainer(local_epochs_for(rows, params), device)
    trainer.fit(system, loader)
    return cpu_copy(model.state_dict()), rows, system.history[-1]


def client_class_statistics(
    global_state: Mapping[str, torch.Tensor],
    client_table: ImageTable | TableStream,
    device: str = "auto",
    *,
    model_config: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """Client side of the class-mean head: what one client shares about its features.

    Returns ``sums`` ``(num_classes, d)``: per-class sums of unit-normalised embeddings,
    ``counts`` ``(num_classes,)``: rows per class, ``norm_sum``: sum of embedding norms.
    A :class:`~pipelines.io.TableStream` is read batch by batch.
    """
    from pipelines.models.devices import resolve_accelerator
    from pipelines.models.probes import extract_features

    model = build_classifier(model_config)
    model.load_state_dict(global_state)
    num_classes = int(model_config["num_classes"])
    embedding_dim = model.encoder.embedding_dim
    sums = torch.zeros(num_classes, embedding_dim, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    norm_sum = torch.zeros((), dtype=torch.float64)
    accelerator = resolve_accelerator(device)
    for images, batch_labels in batches_with_labels(client_table):
        if len(images) == 0:
            continue
        features = torch.from_numpy(
            extract_features(model.encoder, images, device=accelerator)
        ).double()
        norms = features.norm(dim=1)
        labels = torch.from_numpy(np.array(batch_labels, dtype=np.int64))
        sums.index_add_(0, labels, features / norms.clamp_min(1e-12)[:, None])
        counts += torch.bincount(labels, minlength=num_classes).double()
        norm_sum += norms.sum()
    return {"sums": sums, "counts": counts, "norm_sum": norm_sum}


def class_mean_head(
    statistics: list[Mapping[str, torch.Tensor]], scale: float = HEAD_INIT_SCALE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Server side: ``(weight, bias, present)`` of a nearest-class-mean head from the clients'
    :func:`client_class_statistics`.

    With ``m_c`` the mean unit embedding of class ``c`` and ``g`` the mean of the class
    means, the head computes ``scale * d_c · (u - g)`` for a unit embedding ``u``, where
    ``d_c`` is the unit direction of ``m_c - g`` (the head reads raw embeddings, so the
    weights are divided by their mean norm). Centring keeps the rows apart even when all
    embeddings share one direction, as a weak encoder's do, so cross-entropy still sends
    useful gradients into the encoder. ``present`` marks the classes some client holds;
    the other rows are zero.
    """
    sums = sum(s["sums"] for s in statistics)
    counts = sum(s["counts"] for s in statistics)
    if float(counts.sum()) == 0:
        raise ValueError("no client holds any labeled row")
    mean_norm = max(float(sum(s["norm_sum"] for s in statistics)) / float(counts.sum()), 1e-12)
    present = counts > 0
    means = sums[present] / counts[present, None]
    centre = means.mean(dim=0)
    offsets = means - centre
    directions = offsets / offsets.norm(dim=1, keepdim=True).clamp_min(1e-12)
    weight = torch.zeros_like(sums)
    bias = torch.zeros(len(sums), dtype=sums.dtype)
    weight[present] = directions * scale / mean_norm
    bias[present] = -(directions @ centre) * scale
    return weight.float(), bias.float(), present


def with_class_mean_head(
    state: Mapping[str, torch.Tensor], statistics: list[Mapping[str, torch.Tensor]]
) -> StateDict:
    """A copy of ``state`` with its head set by :func:`class_mean_head` from the clients'
    :func:`client_class_statistics`; classes no client holds keep their initial weights and
    get a zero bias."""
    weight, bias, present = class_mean_head(statistics)
    new_state = cpu_copy(state)
    head_weight, head_bias = new_state["head.weight"], new_state["head.bias"]
    head_weight[present] = weight[present].to(head_weight.dtype)
    head_bias.copy_(bias.to(head_bias.dtype))
    return new_state


def init_head_from_class_means(
    model_config: dict[str, Any],
    state: Mapping[str, torch.Tensor],
    clients: list[ImageTable | TableStream],
    device: str = "auto",
) -> StateDict:
    """``state`` with its head set from federated class means (one pass over each client)."""
    statistics = [
        client_class_statistics(state, client, device, model_config=model_config)
        for client in clients
    ]
    return with_class_mean_head(state, statistics)


def start_classifier(encoder: torch.nn.Module, num_classes: int, seed: int) -> Classifier:
    """The classifier a federation starts from: a copy of ``encoder`` and a new head, drawn
    after seeding every generator with ``seed`` (the same start on every runtime)."""
    from pipelines.models.encoder import build_encoder
    from pipelines.models.seeding import seed_everything

    seed_everything(seed)
    start = build_encoder(encoder.config)
    start.load_state_dict(encoder.state_dict())
    return Classifier(start, num_classes)


def clients_per_round(num_clients: int, fraction: float) -> int:
    """``max(1, round(fraction * num_clients))``, at most ``num_clients``."""
    return min(num_clients, max(1, round(fraction * num_clients)))


def sample_clients(num_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """:func:`clients_per_round` distinct client indices, sorted."""
    count = clients_per_round(num_clients, fraction)
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def round_learning_rate(params: FederateParams, round_index: int) -> float:
    """Client learning rate in round ``round_index`` (1-based): a cosine from
    ``params.learning_rate`` in round 1 to ``FINAL_LR_FRACTION`` of it in the last round."""
    progress = (round_index - 1) / max(params.rounds - 1, 1)
    factor = FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return params.learning_rate * factor


def evaluate_accuracy(model: Classifier, table: ImageTable, device: str = "auto") -> float:
    """Accuracy of ``model`` on ``table``."""
    from pipelines.models.devices import resolve_accelerator
    from pipelines.models.probes import predict_logits

    logits = predict_logits(model, table.images, device=resolve_accelerator(device))
    return float((logits.argmax(1) == table.labels).mean())


class FederationError(LeptonError):
    """A round could not go on (too few acceptable updates); the previous model stays."""


ClientTrainer = Callable[..., tuple[StateDict, int, float]]
Collector = Callable[[StateDict, list[int], FederateParams, int], "RoundUpdates"]


@dataclass
class RoundUpdates:
    """What came back from the clients of one round: updates and who was left out.

    A transport that sees only the sample-weighted mean of the updates (SecAgg+) leaves
    ``updates`` empty and sets ``mean``; ``clients``, ``sizes`` and ``losses`` still list
    each client whose update is in it."""

    clients: list[int] = field(default_factory=list)
    updates: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    dropped: list[Rejection] = field(default_factory=list)
    mean: torch.Tensor | None = None


def collect_updates(
    state: StateDict,
    chosen: list[int],
    clients: list[ImageTable | TableStream],
    params: FederateParams,
    round_index: int,
    seed: int,
    device: str,
    model_config: dict[str, Any],
    trainer: ClientTrainer,
) -> RoundUpdates:
    """Train each chosen client; a client that raises or exceeds the timeout is dropped."""
    result = RoundUpdates()
    for index in chosen:
        started = time.perf_counter()
        try:
            new_state, size, loss = trainer(
                state,
                clients[index],
                params,
                client_seed(seed, round_index, index),
                device,
                model_config=model_config,
            )
        except Exception as exc:  # noqa: BLE001 - any client failure drops that client
            result.dropped.append(Rejection(index, f"failed: {type(exc).__name__}: {exc}"))
            continue
        seconds = time.perf_counter() - started
        if params.client_timeout_seconds is not None and seconds > params.client_timeout_seconds:
            result.dropped.append(
                Rejection(index, f"timed out ({seconds:.1f} s > {params.client_timeout_seconds} s)")
            )
            continue
        if size == 0:
            continue
        result.clients.append(index)
        result.updates.append(flatten_update(new_state, state))
        result.sizes.append(size)
        result.losses.append(loss)
    return result


def make_server_optimizer(params: FederateParams) -> ServerOptimizer:
    """``adam`` for FedAdam, else ``sgd`` at the server learning rate."""
    return ServerOptimizer(
        kind="adam" if params.strategy == "fedadam" else "sgd",
        learning_rate=params.server_learning_rate,
        beta1=params.server_beta1,
        beta2=params.server_beta2,
        tau=params.server_tau,
    )


def planned_rounds(params: FederateParams, num_clients: int) -> tuple[int, float, float]:
    """``(rounds, sample_rate, ε)``: with DP and a target ε, the rounds that stay within it."""
    sample_rate = clients_per_round(num_clients, params.client_fraction) / num_clients
    if not params.dp.enabled:
        return params.rounds, sample_rate, math.inf
    dp = params.dp
    rounds = params.rounds
    if dp.target_epsilon is not None:
        rounds = rounds_within(
            dp.target_epsilon, rounds, dp.noise_multiplier, sample_rate, dp.delta
        )
    return rounds, sample_rate, epsilon_after(rounds, dp.noise_multiplier, sample_rate, dp.delta)


def run_federation(
    model_config: dict[str, Any],
    initial_state: Mapping[str, torch.Tensor],
    clients: list[ImageTable | TableStream],
    val: ImageTable | None,
    params: FederateParams,
    seed: int,
    device: str = "auto",
    on_round: RoundHook | None = None,
    trainer: ClientTrainer = train_client,
    collect: Collector | None = None,
    build: Callable[[dict[str, Any]], torch.nn.Module] = build_classifier,
    score: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    checkpoint: Checkpoint | None = None,
) -> tuple[Classifier, list[dict[str, float]]]:
    """Federated training for the planned rounds; returns the final model and history.

    The model is ``build(model_config)`` (a classifier by default) and each round is scored
    by ``score(model)``, by default ``{"val_accuracy": ...}`` on ``val``; federated SimCLR
    (:mod:`pipelines.federated.ssl`) passes its own model, trainer and score.

    ``clients`` are the client shards (in process), or any sequence of K client handles when
    ``collect`` gathers the updates elsewhere (the Flower runtime passes its node ids and a
    ``collect`` that sends the round to them). ``collect(state, chosen, round_params,
    round_index)`` returns the round's :class:`RoundUpdates`.

    Each round samples ``params.client_fraction`` of the clients (seeded by ``seed``), trains
    each with ``trainer`` (:func:`train_client`; learning rate from
    :func:`round_learning_rate`; FedProx adds its proximal term), drops clients that fail or
    time out, screens the updates (:func:`~pipelines.federated.strategies.screen_updates`),
    aggregates the accepted ones with ``params.aggregator`` (or the DP-FedAvg clipped, noised
    mean) and applies the result with the server optimizer. Fewer than ``params.min_clients``
    accepted updates raise :class:`FederationError`. History rows: ``round, val_accuracy,
    train_loss`` (sample-weighted mean over accepted clients), ``clients`` (sampled),
    ``accepted``, ``rejected``, ``dropped``, ``samples`` (rows trained on, times local
    epochs), ``epsilon`` (DP only: ε after this round). ``on_round(round, row)`` is called
    after each round; rejections and drops are logged with client and reason.

    With a ``checkpoint``, every round ends by saving what the next one needs (global
    weights, server-optimizer moments, the sampling and noise generators, the history), and
    a run that finds one resumes after its round: the result is the same, bit for bit on
    the CPU, as a run that was never interrupted (client seeds depend only on the round).
    """
    if not clients:
        raise ValueError("federation needs at least one client")
    rounds, sample_rate, _ = planned_rounds(params, len(clients))
    rng = np.random.default_rng(seed)
    noise = torch.Generator().manual_seed(int(seed))
    server = make_server_optimizer(params)
    aggregate = AGGREGATORS[params.aggregator]
    needed = max(
        params.min_clients,
        min_updates_for(params.aggregator, params.trim_fraction, params.byzantine_clients),
    )
    model = build(model_config)
    # the model's own key order: updates and the server optimizer's moments are flat vectors
    # in this order, which must not depend on how the start state was loaded (a checkpoint
    # resumed in another process, a state read back from safetensors)
    state = cpu_copy({key: initial_state[key] for key in model.state_dict()})
    if score is None:

        def score(model):
            return {"val_accuracy": evaluate_accuracy(model, val, device)}

    history: list[dict[str, float]] = []
    if collect is None:

        def collect(state, chosen, round_params, round_index):
            return collect_updates(
                state,
                chosen,
                clients,
                round_params,
                round_index,
                seed,
                device,
                model_config,
                trainer,
            )

    first_round = 1
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        first_round, restored, history = resume_round(saved, server, rng, noise)
        state = {key: restored[key] for key in state}  # updates are flat in this key order
        model.load_state_dict(state)
        log.info("resuming after round %d of %d (%s)", first_round - 1, rounds, checkpoint.path)
        for row in history:
            if on_round is not None:
                on_round(int(row["round"]), row)
    for round_index in range(first_round, rounds + 1):
        chosen = sample_clients(len(clients), params.client_fraction, rng)
        round_params = params.model_copy(
            update={"learning_rate": round_learning_rate(params, round_index)}
        )
        got = collect(state, chosen, round_params, round_index)
        if got.mean is None:
            accepted, rejected = screen_updates(got.clients, got.updates, params.max_update_norm)
        else:  # only the mean came back: nothing to screen
            accepted, rejected = list(range(len(got.clients))), []
        for problem in [*got.dropped, *rejected]:
            log.warning(
                "round %d: client %d left out: %s", round_index, problem.client, problem.reason
            )
        if len(accepted) < needed:
            left_out = "; ".join(
                f"client {r.client}: {r.reason}" for r in [*got.dropped, *rejected]
            )
            raise FederationError(
                f"round {round_index}: {len(accepted)} acceptable client updates, "
                f"{needed} needed (federate.min_clients / the aggregator); "
                f"left out: {left_out or 'none'}"
            )
        updates = [got.updates[i] for i in accepted] if got.mean is None else []
        sizes = [got.sizes[i] for i in accepted]
        if got.mean is not None:
            combined = got.mean
        elif params.dp.enabled:
            combined = private_mean(
                updates, params.dp.clip_norm, params.dp.noise_multiplier, len(chosen), noise
            )
        else:
            combined = aggregate(
                torch.stack(updates),
                torch.tensor(sizes, dtype=torch.float64),
                trim_fraction=params.trim_fraction,
                byzantine_clients=params.byzantine_clients,
                krum_selected=params.krum_selected,
            )
        state = apply_update(state, server.step(combined))
        model.load_state_dict(state)
        losses = [got.losses[i] for i in accepted]
        row = {
            "round": round_index,
            **score(model),
            "train_loss": sum(n * loss for n, loss in zip(sizes, losses, strict=True)) / sum(sizes),
            "clients": len(chosen),
            "accepted": len(accepted),
            "rejected": len(rejected),
            "dropped": len(got.dropped),
            "samples": sum(n * local_epochs_for(n, params) for n in got.sizes),
        }
        if params.dp.enabled:
            row["epsilon"] = epsilon_after(
                round_index, params.dp.noise_multiplier, sample_rate, params.dp.delta
            )
        history.append(row)
        if checkpoint is not None:
            save_round(checkpoint, round_index, state, server, rng, noise, history)
        if on_round is not None:
            on_round(round_index, row)
    return model.eval(), history


def save_round(
    checkpoint: Checkpoint,
    round_index: int,
    state: Mapping[str, torch.Tensor],
    server: ServerOptimizer,
    rng: np.random.Generator,
    noise: torch.Generator,
    history: list[dict[str, float]],
) -> None:
    """Save what the round after ``round_index`` needs to resume (see
    :func:`run_federation`)."""
    tensors = {f"state/{k}": v for k, v in state.items()}
    tensors.update({f"server/{k}": v for k, v in server.state_tensors().items()})
    tensors["noise_generator"] = noise.get_state()
    meta = {"round": round_index, "rng": rng.bit_generator.state, "history": history}
    checkpoint.save(tensors, meta)


def resume_round(
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]],
    server: ServerOptimizer,
    rng: np.random.Generator,
    noise: torch.Generator,
) -> tuple[int, StateDict, list[dict[str, float]]]:
    """Restore a :func:`save_round` checkpoint into ``server``, ``rng`` and ``noise``;
    returns ``(first round to run, global state, history so far)``."""
    tensors, meta = saved
    state = {k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")}
    server.load_state_tensors(
        {k.removeprefix("server/"): v for k, v in tensors.items() if k.startswith("server/")}
    )
    rng.bit_generator.state = meta["rng"]
    noise.set_state(tensors["noise_generator"])
    return int(meta["round"]) + 1, state, list(meta["history"])
