"""pretrain with DDP: two CPU processes (gloo) through torchrun and Lightning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import PretrainParams
from pipelines.errors import ConfigError
from pipelines.io import ImageTable
from pipelines.models.distributed import torchrun_command


@pytest.fixture
def digits() -> ImageTable:
    from sklearn.datasets import load_digits

    data = load_digits()
    return ImageTable((data.images[:400] / 16).astype(np.float32), data.target[:400], 10)


def test_ddp_pretrain_runs_two_ranks_on_cpu(digits, caplog):
    from pipelines.stages.pretrain import pretrain

    p = PretrainParams(strategy="ddp", devices=2, epochs=2, batch_size=64, embedding_dim=16)
    seen = []
    with caplog.at_level(logging.INFO):
        encoder, losses = pretrain(digits, p, 42, "cpu", lambda e, loss: seen.append((e, loss)))
    assert "DDP over 2 processes, rows per rank [200, 200]" in caplog.text
    assert [e for e, _ in seen] == [1, 2] and losses[1] < losses[0]
    assert encoder(__import__("torch").rand(3, 1, 8, 8)).shape == (3, 16)


def test_torchrun_command_for_one_and_several_nodes(tmp_path, monkeypatch):
    single = torchrun_command(tmp_path / "spec.json", 2, 1)
    assert "--standalone" in single and "--nproc-per-node=2" in single
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("NODE_RANK", "1")
    multi = torchrun_command(tmp_path / "spec.json", 4, 2)
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.7"} <= set(multi)
    assert multi[-2:] == ["pipelines.models.distributed", str(tmp_path / "spec.json")]


def test_more_devices_need_the_ddp_strategy(tmp_path):
    from pipelines.config import load_params

    (tmp_path / "params.yaml").write_text("pretrain:\n  devices: 2\n")
    with pytest.raises(ConfigError, match="strategy 'ddp'"):
        load_params(tmp_path / "params.yaml")


def test_ddp_classifier_fit_starts_from_the_given_weights(digits, tmp_path):
    """The centralized baseline's DDP fit: two CPU ranks, cross-entropy from a start state;
    it learns (loss falls, accuracy above chance) and rank 0's weights come back."""
    import torch

    from pipelines.io import write_image_table
    from pipelines.models.distributed import fit_classifier_distributed
    from pipelines.models.encoder import build_classifier, classifier_config, encoder_config_for

    config = classifier_config(encoder_config_for((8, 8), 1, 16), 10)
    torch.manual_seed(0)
    start = build_classifier(config).state_dict()
    write_image_table(digits, tmp_path / "train.parquet")
    fit = {"epochs": 3, "batch_size": 32, "learning_rate": 0.002, "devices": 2, "num_nodes": 1}
    model, losses, result = fit_classifier_distributed(
        tmp_path / "train.parquet", config, start, fit, 42, "cpu", tmp_path / "out"
    )
    assert result["world_size"] == 2 and result["rows_per_rank"] == [200, 200]
    assert len(losses) == 3 and losses[-1] < losses[0]
    with torch.no_grad():
        predicted = model(torch.from_numpy(digits.images)).argmax(1).numpy()
    assert (predicted == digits.labels).mean() > 0.3  # chance: 0.1
    assert not torch.equal(model.state_dict()["head.weight"], start["head.weight"])


_NODE_SCRIPT = """
import logging
import sys
from pathlib import Path
from safetensors.torch import save_file
from pipelines.checkpoints import Checkpoint
from pipelines.config import PretrainParams
from pipelines.io import read_image_table
from pipelines.stages.pretrain import pretrain
logging.basicConfig(level=logging.INFO)  # rank 0's progress lines
p = PretrainParams.model_validate_json(sys.argv[1])
checkpoint = Checkpoint(Path(sys.argv[3]))
encoder, _ = pretrain(read_image_table(sys.argv[2]), p, 42, "cpu", checkpoint=checkpoint)
if encoder is not None:  # node 0
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, sys.argv[4])
"""


def _start_pretrain(p, pool: Path, checkpoint: Path, out: Path, log: Path, env=None):
    """The pretrain of ``p`` on ``pool`` in a process of its own (a session: SIGKILL of its
    group takes torchrun and the ranks), saving into ``checkpoint``; node 0 writes the
    encoder to ``out``."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    argv = [sys.executable, "-c", _NODE_SCRIPT, p.model_dump_json(), str(pool), str(checkpoint)]
    return subprocess.Popen(
        [*argv, str(out)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_once_saved(checkpoint, processes, log: Path, epoch: int = 2) -> None:
    """SIGKILL every process group of ``processes`` once ``checkpoint`` holds ``epoch``
    (all must still run until then; 300 s at most)."""
    import os
    import signal
    import time

    deadline = time.monotonic() + 300
    while (saved := checkpoint.load()) is None or saved[1]["epoch"] < epoch:
        assert all(p.poll() is None for p in processes), (
            "the fit ended before it was killed:\n" + log.read_text()[-3000:]
        )
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for process in processes:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_ddp_pretrain_killed_mid_fit_resumes_to_the_same_encoder(digits, tmp_path):
    """SIGKILL the DDP fit (torchrun and both ranks) once an epoch is saved; the rerun
    resumes after it, each rank with its own generators, to the same weights."""

    import torch

    from pipelines.checkpoints import Checkpoint
    from pipelines.io import write_image_table
    from pipelines.stages.pretrain import pretrain

    p = PretrainParams(strategy="ddp", devices=2, epochs=8, batch_size=64, embedding_dim=16)
    reference, losses = pretrain(digits, p, 42, "cpu")

    write_image_table(digits, tmp_path / "pool.parquet")
    checkpoint = Checkpoint(tmp_path / "pretrain.safetensors")
    log = tmp_path / "attempt.log"
    attempt = _start_pretrain(
        p, tmp_path / "pool.parquet", checkpoint.path, tmp_path / "unused.safetensors", log
    )
    _kill_once_saved(checkpoint, [attempt], log)
    killed_at = checkpoint.load()[1]["epoch"]
    assert 2 <= killed_at < 8 and checkpoint.load()[1]["world_size"] == 2

    resumed, resumed_losses = pretrain(digits, p, 42, "cpu", checkpoint=checkpoint)
    assert resumed_losses == losses
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_ddp_pretrain_over_two_nodes_killed_resumes_from_node_zeros_checkpoint(digits, tmp_path):
    """Two nodes of one rank each (two stage processes sharing no folder, on loopback):
    SIGKILL both once node 0 saved an epoch; node 1 has no checkpoint of its own, the rerun
    resumes every rank from node 0's, to the weights of one uninterrupted node of two
    ranks (one torch thread a rank on both)."""

    import torch
    from safetensors.torch import load_file

    from pipelines.checkpoints import Checkpoint
    from pipelines.federated.flower_deploy import free_port
    from pipelines.io import write_image_table
    from pipelines.stages.pretrain import pretrain

    one_node = PretrainParams(strategy="ddp", devices=2, epochs=6, batch_size=64, embedding_dim=16)
    reference, _ = pretrain(digits, one_node, 42, "cpu")
    two_nodes = one_node.model_copy(update={"devices": 1, "num_nodes": 2})
    write_image_table(digits, tmp_path / "pool.parquet")
    checkpoints = [Checkpoint(tmp_path / f"node{i}" / "pretrain.safetensors") for i in (0, 1)]
    out = tmp_path / "encoder.safetensors"

    def start_nodes() -> list:
        port = str(free_port())
        return [
            _start_pretrain(
                two_nodes,
                tmp_path / "pool.parquet",
                checkpoints[rank].path,
                out,
                tmp_path / f"node{rank}.log",
                {
                    "NODE_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "OMP_NUM_THREADS": "1",  # as torchrun sets it for two ranks on one node
                },
            )
            for rank in (0, 1)
        ]

    _kill_once_saved(checkpoints[0], start_nodes(), tmp_path / "node0.log")
    killed_at = checkpoints[0].load()[1]["epoch"]
    assert 2 <= killed_at < 6 and checkpoints[0].load()[1]["world_size"] == 2
    assert checkpoints[1].load() is None  # node 1 never wrote one

    nodes = start_nodes()
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=300) == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    assert f"resuming after epoch {killed_at} of 6" in (tmp_path / "node0.log").read_text()
    resumed = load_file(out)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed[key], value), key
