"""Resume a Lightning fit after a kill: a checkpoint at the end of every epoch.

:class:`EpochCheckpoint` saves, into a :class:`~pipelines.checkpoints.Checkpoint` (one
safetensors file, no pickle), everything the next epoch depends on: the module's weights,
the optimizer's and the learning-rate scheduler's state, the random generators (the
augmentation generator, the loader's shuffling generator, torch's global one) and the loss
history. :func:`resume_fit` then runs only the epochs that are left, and on the CPU the
result is the same, bit for bit, as an uninterrupted fit.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl

from pipelines.checkpoints import Checkpoint


def split_tensors(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` (nested dicts, lists, numbers) with each tensor moved into ``tensors`` under
    a name from ``prefix`` and replaced by ``{"__tensor__": name}``: the JSON-able rest."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {str(k): split_tensors(v, f"{prefix}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [split_tensors(v, f"{prefix}/{i}", tensors) for i, v in enumerate(value)]
    return value


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors` (lists stay lists; integer keys of an optimizer's
    ``state`` come back as ints)."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {(int(k) if k.isdigit() else k): join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def saved_module_state(
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]],
) -> dict[str, torch.Tensor]:
    """The module weights in an :class:`EpochCheckpoint` save."""
    return {k.removeprefix("module/"): v for k, v in saved[0].items() if k.startswith("module/")}


class EpochCheckpoint(pl.callbacks.Checkpoint):
    """Save the fit's state after every epoch; restore a saved one when the fit starts.

    What is saved: the module's weights; the optimizer's state; the module's learning-rate
    schedule (its ``lr_schedule`` attribute, which the module steps itself at the end of
    each epoch); its loss ``history``; the random generators of the module
    (``module.random_generators()``), of ``loader_generators`` and torch's global one.
    ``saved``: what :meth:`Checkpoint.load` returned (None: a fresh fit), restored in
    ``on_train_start``, before the first batch is drawn. As a Lightning ``Checkpoint``
    callback it runs after the module's own end-of-epoch hook, so it saves the state the
    next epoch starts from.

    Under DDP the weights and optimizer state are the same on every rank, but each rank
    draws its own views: the generators of every rank are gathered (one row per rank) and
    rank 0 writes the file; on resume each rank takes its own row.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        loader_generators: dict[str, torch.Generator] | None = None,
        saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    ):
        self.checkpoint = checkpoint
        self.loader_generators = dict(loader_generators or {})
        self.saved = saved

    @property
    def done_epochs(self) -> int:
        """Epochs the saved state had finished (0 for a fresh fit)."""
        return int(self.saved[1]["epoch"]) if self.saved is not None else 0

    def _generators(self, pl_module) -> dict[str, torch.Generator]:
        found = getattr(pl_module, "random_generators", dict)()
        return {**{f"module.{k}": v for k, v in found.items()}, **self.loader_generators}

    def on_train_start(self, trainer, pl_module) -> None:
        if self.saved is None:
            return
        tensors, meta = self.saved
        pl_module.load_state_dict(saved_module_state(self.saved))
        trainer.optimizers[0].load_state_dict(join_tensors(meta["optimizer"], tensors))
        schedule = getattr(pl_module, "lr_schedule", None)
        if schedule is not None:
            schedule.load_state_dict(join_tensors(meta["scheduler"], tensors))
        pl_module.history[:] = meta["history"]
        if int(meta.get("world_size", 1)) != trainer.world_size:
            raise ValueError(
                f"{self.checkpoint.path}: saved by {meta.get('world_size', 1)} processes, "
                f"resumed by {trainer.world_size}"
            )

        def own(name: str) -> torch.Tensor:
            state = tensors[f"generator/{name}"]
            return state[trainer.global_rank].clone() if trainer.world_size > 1 else state

        for name, generator in self._generators(pl_module).items():
            generator.set_state(own(name))
        torch.set_rng_state(own("__global__"))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        tensors: dict[str, torch.Tensor] = {
            f"module/{k}": v for k, v in pl_module.state_dict().items()
        }
        meta: dict[str, Any] = {
            "epoch": self.done_epochs + trainer.current_epoch + 1,
            "history": list(pl_module.history),
            "optimizer": split_tensors(trainer.optimizers[0].state_dict(), "optimizer", tensors),
        }
        schedule = getattr(pl_module, "lr_schedule", None)
        if schedule is not None:
            meta["scheduler"] = split_tensors(schedule.state_dict(), "scheduler", tensors)
        generators = {
            name: generator.get_state() for name, generator in self._generators(pl_module).items()
        }
        generators["__global__"] = torch.get_rng_state()
        if trainer.world_size > 1:  # a collective: every rank takes part, rank 0 writes
            meta["world_size"] = trainer.world_size
            generators = {name: gather_rows(trainer, state) for name, state in generators.items()}
        tensors.update({f"generator/{name}": state for name, state in generators.items()})
        if trainer.global_rank == 0:
            self.checkpoint.save(tensors, meta)


def gather_rows(trainer, state: torch.Tensor) -> torch.Tensor:
    """Every rank's ``state`` (a generator's bytes), one row per rank, on the CPU."""
    gathered = trainer.strategy.all_gather(state.to(trainer.strategy.root_device, torch.int32))
    return gathered.reshape(trainer.world_size, -1).to("cpu", torch.uint8)
