"""SimCLR pretraining with distributed data parallel (DDP) through Lightning.

``pretrain.strategy: ddp`` runs the fit in ``pretrain.devices`` processes per node on
``pretrain.num_nodes`` nodes, launched by ``torch.distributed.run`` (torchrun) as
``python -m pipelines.models.distributed SPEC.json``. Each process is one Lightning DDP
rank: gloo on CPU, NCCL on CUDA (one GPU a process). Lightning shards the rows with a
``DistributedSampler``; each rank draws its own augmentations (seed + rank), takes
``batch_size / world size`` rows a step (so a step sees ``batch_size`` rows in all) and
averages gradients with the others. Rank 0 writes the encoder and the loss history (its
own mean NT-Xent per epoch) into the spec's folder, which the stage then reads back.

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
) -> tuple[Any, list[float], dict[str, Any]]:
    """Run the DDP fit described by ``params`` (the pretrain section) on the unlabeled table
    ``table_path``; return ``(encoder on CPU in eval mode, losses per epoch, result)``. On a
    node other than node 0 the encoder is None: node 0 holds the result.

    ``result`` holds ``world_size`` and the rows each rank trained on. A failed process is
    a RuntimeError with the tail of the launcher's output.
    """
    from pipelines.io import load_weights
    from pipelines.models.encoder import build_encoder

    workdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "table": str(table_path),
        "encoder_config": encoder_config,
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
        raise RuntimeError(f"DDP pretraining failed (exit {code}):\n{tail}")
    if params["num_nodes"] > 1 and node_rank() != 0:
        return None, [], {"world_size": params["devices"] * params["num_nodes"]}
    result = json.loads((workdir / RESULT_FILE).read_text())
    state, config = load_weights(workdir, WEIGHTS_FILE)
    encoder = build_encoder(config)
    encoder.load_state_dict(state)
    return encoder.eval(), list(result["losses"]), result


def _worker(spec_path: Path) -> None:
    """One DDP rank (started by torchrun): fit, then rank 0 writes the encoder."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipelines.io import read_image_table, save_weights
    from pipelines.models.encoder import ProjectionHead, build_encoder, to_tensor
    from pipelines.models.systems import SimCLRSystem, make_trainer, pl

    spec = json.loads(spec_path.read_text())
    p = spec["params"]
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pl.seed_everything(spec["seed"], verbose=False)  # same initial weights on every rank
    encoder = build_encoder(spec["encoder_config"])
    head = ProjectionHead(p["embedding_dim"], p["projection_dim"])
    system = SimCLRSystem(
        encoder,
        head,
        temperature=p["temperature"],
        learning_rate=p["learning_rate"],
        weight_decay=p["weight_decay"],
        seed=spec["seed"] + rank,
        on_epoch_end=lambda epoch, loss: (
            print(f"epoch {epoch} train_loss={loss:.4f}", flush=True) if rank == 0 else None
        ),
    )
    images = to_tensor(read_image_table(spec["table"]).images)
    loader = DataLoader(
        TensorDataset(images),
        batch_size=max(1, p["batch_size"] // world),
        shuffle=True,
        generator=torch.Generator().manual_seed(spec["seed"]),
    )
    trainer = make_trainer(
        p["epochs"],
        spec["accelerator"],
        devices=p["devices"],
        num_nodes=p["num_nodes"],
        strategy="ddp",
    )
    trainer.fit(system, loader)
    rows = torch.tensor([system.rows_seen / max(p["epochs"], 1)], dtype=torch.float64)
    gathered = trainer.strategy.all_gather(rows).reshape(-1).tolist()
    if trainer.global_rank == 0:
        out = Path(spec["out"])
        save_weights(encoder.cpu(), out, encoder.config, name=WEIGHTS_FILE)
        result = {
            "losses": list(system.history),
            "world_size": trainer.world_size,
            "rows_per_rank": [int(r) for r in gathered],
        }
        (out / RESULT_FILE).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
