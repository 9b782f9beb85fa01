"""Lightning "systems": thin LightningModules that train the plain models of ``encoder.py``.

- :class:`SimCLRSystem`: encoder + projection head, two augmented views per image, NT-Xent.
- :class:`ClassifierSystem`: cross-entropy training of a :class:`Classifier` (a federated
  client's local fit).
- :class:`DistillationSystem`: a student classifier learning a teacher's soft predictions
  (the optimize stage's distilled and pruned variants).

Both keep the mean training loss of every epoch in ``history`` and may call an
``on_epoch_end(epoch, loss)`` function (progress lines, MLflow). :func:`make_trainer` builds
the quiet, cheap Trainer every fit uses; :func:`batch_loader` a fast loader over in-memory
tensors.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from pipelines.models.augment import AugmentConfig, augment
from pipelines.models.devices import resolve_accelerator
from pipelines.models.encoder import Classifier, Encoder, ProjectionHead
from pipelines.models.losses import NTXentLoss, distillation_loss

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

EpochHook = Callable[[int, float], None]

_LIGHTNING_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "lightning_fabric",
    "pytorch_lightning",
)


def _quiet_lightning_warnings() -> None:
    # every Trainer: pytest and other callers may reset the warning filters between fits
    # in-memory tensors: worker processes would only add start-up time
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # raised inside Lightning's own pytree helper on every fit with torch >= 2.10
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


@functools.cache
def _callback_factories(group: str) -> tuple:
    """The entry points of ``group``, read once per process."""
    return tuple(entry_points(group=group))


def _load_external_callbacks_once(group: str) -> list[Any]:
    """Lightning's ``_load_external_callbacks`` with the entry-point scan done once.

    Lightning reads every installed package's entry points in each ``Trainer()`` (11 ms
    with this project's environment, ``benchmarks/trainer_startup.py``), more than a whole
    federated client's fit on digits costs besides its steps. Installed packages do not
    change during a run; the factories are still called for every Trainer, so each gets
    fresh callback instances, as in Lightning.
    """
    callbacks: list[Any] = []
    for factory in _callback_factories(group):
        made = factory.load()()
        callbacks.extend(made if isinstance(made, list) else [made])
    return callbacks


@functools.cache
def _prepare_lightning_once() -> None:
    """Per-process Lightning set-up: quiet loggers (each ``setLevel`` clears every logger's
    cache) and the entry-point scan of :func:`_load_external_callbacks_once`."""
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from pytorch_lightning.trainer.connectors import callback_connector
    except ImportError:  # the unified ``lightning`` package
        from lightning.pytorch.trainer.connectors import callback_connector
    if hasattr(callback_connector, "_load_external_callbacks"):
        callback_connector._load_external_callbacks = _load_external_callbacks_once


def make_trainer(
    max_epochs: int,
    device: str = "auto",
    callbacks: list | None = None,
    *,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
) -> pl.Trainer:
    """A quiet Trainer: no progress bar, logger, Lightning checkpoints or model summary.

    ``device`` is ``common.device``. One device unless ``strategy="ddp"`` with ``devices``
    processes per node on ``num_nodes`` nodes (see :mod:`pipelines.models.distributed`).
    Deterministic algorithms are switched on for CPU, where they cost nothing; on CUDA some
    backward kernels have no deterministic version.
    """
    _prepare_lightning_once()
    _quiet_lightning_warnings()
    accelerator = resolve_accelerator(device)
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        logger=False,
        # off, unless a Checkpoint callback is given (pipelines.models.resume's epoch saves)
        enable_checkpointing=any(isinstance(c, pl.callbacks.Checkpoint) for c in callbacks or []),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=accelerator == "cpu",
        callbacks=callbacks or [],
    )


def batch_loader(
    *tensors: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    """Batches of in-memory tensors, one indexing operation per batch (no per-row collate).

    Shuffling uses its own generator seeded with ``seed``; the last batch may be smaller.
    """
    dataset = TensorDataset(*tensors)
    order = (
        RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        if shuffle
        else SequentialSampler(dataset)
    )
    sampler = BatchSampler(order, batch_size=batch_size, drop_last=False)
    return DataLoader(dataset, sampler=sampler, batch_size=None)


def shuffle_generator(loader: DataLoader) -> torch.Generator:
    """The generator a :func:`batch_loader` shuffles with (its state decides the order of
    every later epoch)."""
    return loader.sampler.sampler.generator


class _EpochLossSystem(pl.LightningModule):
    """Keeps the sample-weighted mean training loss of each epoch in ``history``.

    The loss is not passed to ``self.log``: the Trainers have no logger, and Lightning's
    result collection cost about 0.8 ms per step, a tenth of a digits client's step.
    """

    def __init__(self, on_epoch_end: EpochHook | None = None):
        super().__init__()
        self.history: list[float] = []
        self._on_epoch_end = on_epoch_end
        self._loss_sum: torch.Tensor | None = None
        self._count = 0
        self.rows_seen = 0  # training rows over all epochs (on this process)

    def _track(self, loss: torch.Tensor, batch_size: int) -> None:
        detached = loss.detach() * batch_size
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._count += batch_size
        self.rows_seen += batch_size

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._count = None, 0

    def on_train_epoch_end(self) -> None:
        if self._loss_sum is None:
            return
        mean = float(self._loss_sum.item() / max(self._count, 1))
        self.history.append(mean)
        if self._on_epoch_end is not None:
            self._on_epoch_end(len(self.history), mean)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: a linear ramp from ``1/(w+1)`` of the rate to the
    full rate over ``w = warmup_epochs`` epochs, then a cosine decay over the rest."""
    warmup = max(0, min(warmup_epochs, epochs - 1))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs - warmup, 1))
    if warmup == 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


class SimCLRSystem(_EpochLossSystem):
    """SimCLR: two augmented views of each image, encoder → projection head → NT-Xent.

    AdamW with a cosine learning-rate decay over ``total_epochs`` (default: the Trainer's
    ``max_epochs``; a resumed fit runs fewer), after a linear warm-up over the first
    ``warmup_epochs`` (a constant rate with ``cosine_schedule=False``).
    Without the warm-up, full-rate steps from a random start can collapse the embeddings
    onto a few points, where NT-Xent stays near log(2B − 1) and learns slowly if at all.
    The augmentation generator is seeded with ``seed`` on the training device at fit start.
    """

    def __init__(
        self,
        encoder: Encoder,
        head: ProjectionHead,
        temperature: float = 0.2,
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-4,
        augment_config: AugmentConfig = AugmentConfig(),
        seed: int = 0,
        on_epoch_end: EpochHook | None = None,
        cosine_schedule: bool = True,
        warmup_epochs: int = 0,
        total_epochs: int | None = None,
        warmup_steps: int = 0,
    ):
        super().__init__(on_epoch_end)
        self.encoder = encoder
        self.head = head
        self.cosine_schedule = cosine_schedule
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.criterion = NTXentLoss(temperature)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.augment_config = augment_config
        self.seed = seed
        self.total_epochs = total_epochs
        self._generator: torch.Generator | None = None
        self.lr_schedule: torch.optim.lr_scheduler.LRScheduler | None = None

    def on_fit_start(self) -> None:
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def random_generators(self) -> dict[str, torch.Generator]:
        """The generators the views are drawn from (saved by epoch checkpoints)."""
        return {"augment": self._generator} if self._generator is not None else {}

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.lr_schedule is not None:
            self.lr_schedule.step()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0]  # labels, when the loader has them, are not used
        views = torch.cat(
            [
                augment(images, self._generator, self.augment_config),
                augment(images, self._generator, self.augment_config),
            ]
        )
        z1, z2 = self.head(self.encoder(views)).chunk(2)
        loss = self.criterion(z1, z2)
        self._track(loss, len(images))
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        if not self.cosine_schedule:  # a federated client: the server sets each round's rate
            if self.warmup_steps <= 0:
                return optimizer
            ramp = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0 / self.warmup_steps, total_iters=self.warmup_steps
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}
        epochs = max(int(self.total_epochs or self.trainer.max_epochs or 1), 1)
        # stepped in on_train_epoch_end, where an epoch checkpoint can save it
        self.lr_schedule = warmup_cosine_schedule(optimizer, epochs, self.warmup_epochs)
        return optimizer


class ClassifierSystem(_EpochLossSystem):
    """Cross-entropy training of a :class:`Classifier` with Adam (constant learning rate).

    With an ``augment_config``, each batch is replaced by one random view of it
    (:func:`~pipelines.models.augment.augment`, generator seeded with ``seed``).

    With ``proximal_mu > 0`` the loss adds FedProx's proximal term
    ``mu / 2 * ||w - w_anchor||^2`` over the trainable parameters, ``w_anchor`` being their
    values at construction (the global model a client starts from). The tracked loss is the
    cross-entropy alone, comparable across strategies.
    """

    def __init__(
        self,
        classifier: Classifier | nn.Module,
        learning_rate: float = 2e-3,
        weight_decay: float = 0.0,
        on_epoch_end: EpochHook | None = None,
        proximal_mu: float = 0.0,
        augment_config: AugmentConfig | None = None,
        seed: int = 0,
    ):
        super().__init__(on_epoch_end)
        self.classifier = classifier
        self.augment_config = augment_config
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.proximal_mu = float(proximal_mu)
        self._anchor = (
            [p.detach().clone() for p in classifier.parameters()] if proximal_mu > 0 else []
        )

    def proximal_term(self) -> torch.Tensor:
        """``mu / 2 * ||w - w_anchor||^2`` (zero without FedProx)."""
        if not self._anchor:
            return torch.zeros((), device=self.device)
        total = sum(
            (p - a.to(p.device)).pow(2).sum()
            for p, a in zip(self.classifier.parameters(), self._anchor, strict=True)
        )
        return 0.5 * self.proximal_mu * total

    def on_fit_start(self) -> None:
        if self.augment_config is not None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.augment_config is not None:
            images = augment(images, self._generator, self.augment_config)
        loss = F.cross_entropy(self.classifier(images), labels)
        self._track(loss, len(images))
        return loss + self.proximal_term() if self._anchor else loss

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.classifier.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )


class DistillationSystem(_EpochLossSystem):
    """Knowledge distillation of ``teacher`` (frozen, eval mode) into ``student``.

    Each batch is ``(images,)`` or ``(images, labels)``; with an ``augment_config`` it is
    replaced by one random view, which teacher and student both see. The loss is
    :func:`~pipelines.models.losses.distillation_loss` (without a teacher: cross-entropy on
    the labels, the baseline a distilled student is compared with). AdamW with the warm-up
    and cosine decay of :func:`warmup_cosine_schedule` over the Trainer's ``max_epochs``.
    """

    def __init__(
        self,
        student: Classifier | nn.Module,
        teacher: nn.Module | None,
        temperature: float = 4.0,
        soft_weight: float = 0.9,
        learning_rate: float = 3e-3,
        weight_decay: float = 1e-4,
        augment_config: AugmentConfig | None = None,
        seed: int = 0,
        warmup_epochs: int = 1,
        on_epoch_end: EpochHook | None = None,
    ):
        super().__init__(on_epoch_end)
        self.student = student
        # not a registered submodule: Lightning neither trains nor moves it with a state dict
        self._teacher = [teacher.eval()] if teacher is not None else []  # run under no_grad
        self.temperature = temperature
        self.soft_weight = soft_weight
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.augment_config = augment_config
        self.seed = seed
        self.warmup_epochs = warmup_epochs
        self._generator: torch.Generator | None = None

    def on_fit_start(self) -> None:
        if self._teacher:
            self._teacher[0].to(self.device)
        if self.augment_config is not None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        if self.augment_config is not None:
            images = augment(images, self._generator, self.augment_config)
        teacher_logits = None
        if self._teacher:
            with torch.no_grad():
                teacher_logits = self._teacher[0](images)
        loss = distillation_loss(
            self.student(images), teacher_logits, labels, self.temperature, self.soft_weight
        )
        self._track(loss, len(images))
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        schedule = warmup_cosine_schedule(optimizer, epochs, self.warmup_epochs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "epoch"},
        }
