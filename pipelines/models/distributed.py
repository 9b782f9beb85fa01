"""Fits with distributed data parallel (DDP) through Lightning: SimCLR pretraining and the
supervised classifier fit of the centralized baseline.

``pretrain.strategy: ddp`` runs the fit in ``pretrain.devices`` processes per node on
``pretrain.num_nodes`` nodes, launched by ``torch.distributed.run`` (torchrun) as
``python -m pipelines.models.distributed SPEC.json``. Each process is one Lightning DDP
rank: gloo on CPU, NCCL on CUDA (one GPU a process). Lightning shards the rows with a
``DistributedSampler``; each rank draws its own augmentations (seed + rank), takes
``batch_size / world size`` rows a step (so a step sees ``batch_size`` rows in all) and
averages gradients with the others. Rank 0 writes the trained weights and the loss history
(its own mean loss per epoch) into the spec's folder, which the caller then reads back.
The spec's ``kind`` picks the fit: ``simclr`` (:func:`fit_distributed`, the pretrain stage)
or ``classifier`` (:func:`fit_classifier_distributed`, cross-entropy from given weights:
``benchmarks/federated.py --strategy ddp``).

One node: the stage starts torchrun itself (``--standalone``). Several nodes: the stage
runs on every node (e.g. a PyTorchJob or one DockerOperator per node) with
``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` in its environment, and only node 0
writes the stage's outputs (see docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
WEIGHTS_FILE = "encoder"  # safetensors + json, pipelines.io.save_weights
INITIAL_FILE = "initial"  # the classifier fit's start weights


def torchrun_command(spec_path: Path, devices: int, num_nodes: int) -> list[str]:
    """The torchrun command line that starts this node's DDP processes."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={devices}"]
    if num_nodes == 1:
        command.append("--standalone")
    else:
        command += [
            f"--nnodes={num_nodes}",
            f"--node-rank={os.environ.get('NODE_RANK', '0')}",
            f"--master-addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
            f"--master-port={os.environ.get('MASTER_PORT', '29500')}",
        ]
    return [*command, "-m", "pipelines.models.distributed", str(spec_path)]


def node_rank() -> int:
    """This node's rank in a multi-node run (``NODE_RANK``; 0 when unset)."""
    return int(os.environ.get("NODE_RANK", "0"))


def fit_distributed(
    table_path: Path,
    encoder_config: dict[str, Any],
    params: dict[str, Any],
    seed: int,
    accelerator: str,
    workdir: Path,
    checkpoint: Path | None = None,
) -> tuple[Any, list[float], dict[str, Any]]:
    """Run the DDP SimCLR fit described by ``params`` (the pretrain section) on the unlabeled
    table ``table_path``; return ``(encoder on CPU in eval mode, losses per epoch, result)``.
    On a node other than node 0 the encoder is None: node 0 holds the result.

    With a ``checkpoint`` file every epoch is saved into it (by rank 0: on node 0) and a
    saved fit resumes after its last epoch, to the same weights on the CPU
    (:class:`~pipelines.models.resume.EpochCheckpoint`); over several nodes every rank
    resumes from node 0's file (:func:`node_zero_checkpoint`). ``result`` holds ``world_size``
    and the rows each rank trained on. A failed process is a RuntimeError with the tail of
    the launcher's output.
    """
    from pipelines.models.encoder import build_encoder

    spec = {"kind": "simclr", "model_config": encoder_config}
    if checkpoint is not None:
        spec["checkpoint"] = str(checkpoint)
    return _launch(spec, table_path, params, seed, accelerator, workdir, build_encoder)


def fit_classifier_distributed(
    table_path: Path,
    classifier_config: dict[str, Any],
    initial_state: dict[str, Any],
    params: dict[str, Any],
    seed: int,
    accelerator: str,
    workdir: Path,
) -> tuple[Any, list[float], dict[str, Any]]:
    """Cross-entropy fit of a classifier from ``initial_state`` on the labeled table
    ``table_path`` in DDP processes; returns ``(classifier on CPU in eval mode, losses per
    epoch, result)`` as :func:`fit_distributed` does.

    ``params`` needs ``epochs``, ``batch_size`` (rows a step over all ranks),
    ``learning_rate`` (Adam, as :class:`~pipelines.models.systems.ClassifierSystem`),
    ``devices`` and ``num_nodes``.
    """
    from pipelines.io import save_weights
    from pipelines.models.encoder import build_classifier

    workdir.mkdir(parents=True, exist_ok=True)
    start = build_classifier(classifier_config)
    start.load_state_dict(initial_state)
    save_weights(start, workdir, classifier_config, name=INITIAL_FILE)
    spec = {"kind": "classifier", "model_config": classifier_config}
    return _launch(spec, table_path, params, seed, accelerator, workdir, build_classifier)


def _launch(
    spec: dict[str, Any],
    table_path: Path,
    params: dict[str, Any],
    seed: int,
    accelerator: str,
    workdir: Path,
    build,
) -> tuple[Any, list[float], dict[str, Any]]:
    """Write the spec, run torchrun on it, read back what rank 0 wrote."""
    from pipelines.io import load_weights

    workdir.mkdir(parents=True, exist_ok=True)
    spec = {
        **spec,
        "table": str(table_path),
        "params": params,
        "seed": seed,
        "accelerator": accelerator,
        "out": str(workdir),
    }
    spec_path = workdir / SPEC_FILE
    spec_path.write_text(json.dumps(spec))
    command = torchrun_command(spec_path, params["devices"], params["num_nodes"])
    log.info("DDP: %s", " ".join(command))
    errors = workdir / "stderr.txt"
    with errors.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        for line in process.stdout:  # rank 0's progress lines, as they come
            log.info("%s", line.rstrip())
        code = process.wait()
    if code != 0:
        tail = errors.read_text()[-3000:]
        raise RuntimeError(f"DDP {spec['kind']} fit failed (exit {code}):\n{tail}")
    if params["num_nodes"] > 1 and node_rank() != 0:
        return None, [], {"world_size": params["devices"] * params["num_nodes"]}
    result = json.loads((workdir / RESULT_FILE).read_text())
    state, config = load_weights(workdir, WEIGHTS_FILE)
    model = build(config)
    model.load_state_dict(state)
    return model.eval(), list(result["losses"]), result


def _simclr_fit(spec: dict[str, Any], rank: int, on_epoch):
    """The SimCLR system of a ``simclr`` spec, the module to save and its dataset tensors."""
    from pipelines.io import read_image_table
    from pipelines.models.encoder import ProjectionHead, build_encoder, to_tensor
    from pipelines.models.systems import SimCLRSystem

    p = spec["params"]
    encoder = build_encoder(spec["model_config"])
    head = ProjectionHead(p["embedding_dim"], p["projection_dim"])
    system = SimCLRSystem(
        encoder,
        head,
        temperature=p["temperature"],
        learning_rate=p["learning_rate"],
        weight_decay=p["weight_decay"],
        warmup_epochs=p["warmup_epochs"],
        seed=spec["seed"] + rank,
        on_epoch_end=on_epoch,
        total_epochs=p["epochs"],
    )
    return system, encoder, (to_tensor(read_image_table(spec["table"]).images),)


def _classifier_fit(spec: dict[str, Any], rank: int, on_epoch):
    """The cross-entropy system of a ``classifier`` spec, from its start weights."""
    import numpy as np
    import torch

    from pipelines.io import load_weights, read_image_table
    from pipelines.models.encoder import build_classifier, to_tensor
    from pipelines.models.systems import ClassifierSystem

    state, config = load_weights(Path(spec["out"]), INITIAL_FILE)
    model = build_classifier(config)
    model.load_state_dict(state)
    system = ClassifierSystem(
        model, learning_rate=spec["params"]["learning_rate"], on_epoch_end=on_epoch
    )
    table = read_image_table(spec["table"])
    labels = torch.from_numpy(np.ascontiguousarray(table.labels, dtype=np.int64))
    return system, model, (to_tensor(table.images), labels)


FITS = {"simclr": _simclr_fit, "classifier": _classifier_fit}


def _worker(spec_path: Path) -> None:
    """One DDP rank (started by torchrun): fit, then rank 0 writes the trained weights."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipelines.models.seeding import seed_everything
    from pipelines.models.systems import make_trainer

    spec = json.loads(spec_path.read_text())
    p = spec["params"]
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    seed_everything(spec["seed"])  # same initial weights on every rank

    def on_epoch(epoch: int, loss: float) -> None:
        if rank == 0:
            print(f"epoch {epoch} train_loss={loss:.4f}", flush=True)

    system, trained, tensors = FITS[spec.get("kind", "simclr")](spec, rank, on_epoch)
    callbacks, done = [], 0
    if spec.get("checkpoint"):
        from pipelines.checkpoints import Checkpoint
        from pipelines.models.resume import EpochCheckpoint, saved_module_state

        checkpoint = Checkpoint(Path(spec["checkpoint"]))
        saved = node_zero_checkpoint(checkpoint, p["num_nodes"], spec["accelerator"])
        callbacks = [EpochCheckpoint(checkpoint, {}, saved)]
        done = callbacks[0].done_epochs
        if done and rank == 0:
            print(f"resuming after epoch {done} of {p['epochs']} ({checkpoint.path})", flush=True)
    dataset = TensorDataset(*tensors)
    loader = DataLoader(
        dataset,
        batch_size=max(1, p["batch_size"] // world),
        sampler=epoch_sampler(dataset, world, rank, spec["seed"], first_epoch=done),
    )
    if done >= p["epochs"]:  # killed after the last epoch's save: its weights are the result
        if rank == 0:
            system.load_state_dict(saved_module_state(saved))
            rows = [len(loader.sampler)] * world
            write_result(spec, trained, list(saved[1]["history"]), world, rows)
        return
    trainer = make_trainer(
        p["epochs"] - done,
        spec["accelerator"],
        callbacks,
        devices=p["devices"],
        num_nodes=p["num_nodes"],
        strategy="ddp",
    )
    trainer.fit(system, loader)
    rows = torch.tensor([system.rows_seen / max(p["epochs"] - done, 1)], dtype=torch.float64)
    gathered = trainer.strategy.all_gather(rows).reshape(-1).tolist()
    if trainer.global_rank == 0:
        write_result(spec, trained, system.history, trainer.world_size, gathered)


def node_zero_checkpoint(checkpoint, num_nodes: int, accelerator: str):
    """What every rank resumes from (``(tensors, meta)`` or None): its node's own
    ``checkpoint`` on one node. Over several nodes only rank 0, on node 0, writes the file
    (the nodes share no disk), so rank 0 reads it and sends its bytes to every rank: the
    process group is opened here, before Lightning, which then uses it (gloo on the CPU,
    NCCL on CUDA, where the bytes go over a gloo group of their own)."""
    import torch
    import torch.distributed as dist

    from pipelines.checkpoints import checkpoint_from_bytes

    if num_nodes == 1:
        return checkpoint.load()
    if not dist.is_initialized():
        if accelerator == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if accelerator == "cuda" else "gloo")
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    data = checkpoint.read_bytes() if dist.get_rank() == 0 else None
    size = torch.tensor([len(data) if data is not None else -1], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    if int(size) < 0:
        return None
    buffer = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data is not None
        else torch.empty(int(size), dtype=torch.uint8)
    )
    dist.broadcast(buffer, src=0, group=group)
    return checkpoint_from_bytes(buffer.numpy().tobytes())


def write_result(spec, trained, history: list[float], world_size: int, rows_per_rank) -> None:
    """Rank 0: the trained weights and ``result.json`` into the spec's folder."""
    from pipelines.io import save_weights

    out = Path(spec["out"])
    save_weights(trained.cpu(), out, trained.config, name=WEIGHTS_FILE)
    result = {
        "losses": list(history),
        "world_size": world_size,
        "rows_per_rank": [int(r) for r in rows_per_rank],
    }
    (out / RESULT_FILE).write_text(json.dumps(result))


def epoch_sampler(dataset, world: int, rank: int, seed: int, first_epoch: int = 0):
    """This rank's share of ``dataset``, reshuffled each epoch (a ``DistributedSampler``
    seeded with ``seed``) and numbering its epochs from ``first_epoch``: a fit resumed
    after epoch k draws epoch k+1's order, as an uninterrupted one would."""
    from torch.utils.data.distributed import DistributedSampler

    class EpochSampler(DistributedSampler):
        def set_epoch(self, epoch: int) -> None:  # Lightning passes the fit's own count
            super().set_epoch(first_epoch + epoch)

    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(0)
    return sampler


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
