"""pretrain with DDP: two CPU processes (gloo) through torchrun and Lightning."""

from __future__ import annotations

import logging

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
