"""A federate stage on Flower killed mid-run resumes from the rounds its ServerApp sent back.

The ServerApp prints each round's checkpoint into its log; the stage writes it into its own
checkpoint file as ``flwr log`` streams it, and a rerun sends it back in the app bundle
(pipelines/federated/flower_deploy.py, ``RelayedCheckpoint``). Killing ``lepton stage run``
also takes down the loopback SuperLink and SuperNodes it started (``die_with_parent``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipelines.federated.flower_deploy import flower_bin
from tests.conftest import BIN, make_federation_workspace, make_workspace, run_stage, workspace_env
from tests.kill_harness import checkpoint_progress

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (flower_bin() / "flower-superlink").exists(),
        reason="the Flower environment is missing: run `make flower-setup`",
    ),
]

FEDERATE = {
    "runtime": "flower",
    "rounds": 3,
    "local_epochs": 1,
    "batch_size": 64,
    "augment": False,
    "min_local_steps": 0,
    "strategy": "fedadam",
    "server_learning_rate": 0.01,
}


def processes_of(root: Path) -> list[int]:
    """Processes whose environment or command line names the workspace ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            seen = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(root).encode() in seen and (entry / "status").read_text().find("zombie") < 0:
            found.append(int(entry.name))
    return found


def command_lines(pids: list[int]) -> dict[int, str]:
    """Each process's command line (for the failure message)."""
    lines = {}
    for pid in pids:
        try:
            lines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            lines[pid] = "(gone)"
    return lines


def test_federate_on_flower_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    root = make_workspace(tmp_path / "ws", {"federate": FEDERATE})
    make_federation_workspace(root)
    weights = root / "models/federate/model.safetensors"

    attempt = subprocess.Popen(
        [str(BIN / "lepton"), "stage", "run", "federate"],
        cwd=root,
        env=workspace_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while checkpoint_progress(root, "federate") < 1:
        assert attempt.poll() is None, "the attempt ended before its first round"
        assert time.monotonic() < deadline, "no round reached the workspace in 300 s"
        time.sleep(0.2)
    os.killpg(attempt.pid, signal.SIGKILL)
    attempt.wait()
    killed_at = checkpoint_progress(root, "federate")
    assert 1 <= killed_at < 3 and not weights.exists()
    deadline = time.monotonic() + 60  # under CI load a graceful exit can take a while
    while (left := processes_of(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Flower processes outlived the killed stage: {command_lines(left)}"

    said = run_stage(root, "federate")
    assert f"resuming after round {killed_at} (" in said
    resumed = weights.read_bytes()
    assert checkpoint_progress(root, "federate") == 0  # cleared once committed
    rounds = (root / "models/federate/rounds.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in rounds[1:]] == ["1", "2", "3"]

    weights.unlink()  # the same params again, uninterrupted: the same weights, bit for bit
    said = run_stage(root, "federate")
    assert "resuming" not in said
    assert weights.read_bytes() == resumed
