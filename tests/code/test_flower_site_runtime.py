"""Lepton's runtime of Flower's SuperNode and ServerApp without Flower's fixed waits
(pipelines/federated/flower_site_runtime.py, PollingGrid and the packed array records in
pipelines/federated/flower.py). The loopback runs in tests/e2e/test_flower*.py go through
all of it; these check each piece on its own."""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.federated.flower import PollingGrid
from pipelines.federated.flower_deploy import flower_bin

REPO = Path(__file__).resolve().parents[2]
needs_flower = pytest.mark.skipif(
    not (flower_bin() / "python").exists(),
    reason="the Flower environment is missing: run `make flower-setup`",
)


@dataclass
class _Metadata:
    reply_to_message_id: str


@dataclass
class _Reply:
    metadata: _Metadata


class _SlowGrid:
    """A grid whose replies come ``delay`` s after the push; counts the pulls."""

    def __init__(self, delay: float, answered: set[str]):
        self.delay, self.answered, self.pulls = delay, answered, 0
        self.nodes = [1, 2]

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return list(messages)

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() - self.pushed_at < self.delay:
            return []
        ready = [i for i in ids if i in self.answered]
        self.answered -= set(ready)
        return [_Reply(_Metadata(i)) for i in ready]

    def get_node_ids(self):
        return self.nodes


def test_polling_grid_returns_as_soon_as_every_reply_came():
    grid = _SlowGrid(delay=0.2, answered={"a", "b"})
    started = time.monotonic()
    replies = PollingGrid(grid, poll_seconds=0.02).send_and_receive(["a", "b"], timeout=10)
    took = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert 0.2 <= took < 1.0  # Flower's own loop would wait 3 s before its second look
    assert grid.pulls >= 3
    assert PollingGrid(grid).get_node_ids() == [1, 2]  # the rest is the wrapped grid's


def test_polling_grid_gives_up_at_its_timeout_with_what_came():
    grid = _SlowGrid(delay=0.0, answered={"a"})
    started = time.monotonic()
    replies = PollingGrid(grid, poll_seconds=0.02).send_and_receive(["a", "b"], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.3 <= time.monotonic() - started < 1.5


class _BlockedPullGrid(_SlowGrid):
    """The first pull waits ``block`` s (on a dead site's reply content, say) and brings
    nothing; the replies in ``answered`` come meanwhile."""

    def __init__(self, block: float, answered: set[str]):
        super().__init__(0.0, answered)
        self.block = block

    def pull_messages(self, ids):
        if self.pulls == 0:
            self.pulls += 1
            time.sleep(self.block)
            return []
        return super().pull_messages(ids)


def test_polling_grid_takes_the_replies_that_came_while_a_pull_outlasted_its_timeout():
    """A pull that waited past the round's timeout (a site killed while sending its reply
    leaves content that never comes) does not cost the other sites their replies: one more
    pull takes what came meanwhile, then the round goes on without the rest."""
    grid = _BlockedPullGrid(block=0.4, answered={"b"})
    started = time.monotonic()
    replies = PollingGrid(grid, poll_seconds=0.02).send_and_receive(["a", "b"], timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["b"]
    assert grid.pulls == 2 and time.monotonic() - started < 1.0


_CHECK_IN_FLOWER = """
import time
import numpy as np
from flwr.supercore.inflatable import inflatable_utils
from flwr.supernode import start_client_internal
from pipelines.federated.flower import _numpy_record, unpack_record
from pipelines.federated.flower_site_runtime import shorten_flower_waits

assert start_client_internal.time is time  # what the shortening replaces
assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 1
shorten_flower_waits(0.05)
started = time.monotonic()
start_client_internal.time.sleep(3)  # the SuperNode's idle wait
assert time.monotonic() - started < 0.5
assert start_client_internal.time.monotonic() > 0  # the rest of `time` is untouched
assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 0.05
assert inflatable_utils.pull_objects.__kwdefaults__["backoff_cap"] == 0.05
# what a ClientApp calls to pull its message, which passes its own defaults on
from flwr.supernode.runtime import run_clientapp

clientapp_pull = run_clientapp.pull_and_inflate_object_from_tree.__kwdefaults__
assert clientapp_pull["initial_backoff"] == 0.05 and clientapp_pull["backoff_cap"] == 0.05
# a missing object is given up after Flower's time limit, not after 500 short waits
for defaults in (clientapp_pull, inflatable_utils.pull_objects.__kwdefaults__):
    assert defaults["max_tries_per_object"] is None and defaults["max_time"] >= 3600
# the ServerApp's pulls of reply content are held to the round's time left, then restored
from pipelines.federated.flower import object_pulls_within

limit = inflatable_utils.pull_objects.__kwdefaults__["max_time"]
with object_pulls_within(12.5):
    assert inflatable_utils.pull_objects.__kwdefaults__["max_time"] == 12.5
with object_pulls_within(-3.0):  # the time is up: one short last look
    assert inflatable_utils.pull_objects.__kwdefaults__["max_time"] == 0.5
with object_pulls_within(None):
    assert inflatable_utils.pull_objects.__kwdefaults__["max_time"] == limit
assert inflatable_utils.pull_objects.__kwdefaults__["max_time"] == limit

arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, dtype=np.int64)}
record = _numpy_record(arrays)
assert list(record.keys()) == ["safetensors"]  # one array, one object to send
back = unpack_record(record)
assert back.keys() == arrays.keys()
assert all(back[k].dtype == arrays[k].dtype and (back[k] == arrays[k]).all() for k in arrays)

import torch
from pipelines.federated.flower_secagg import statistics_from_mean, statistics_vector

gen = torch.Generator().manual_seed(0)
sites = [
    {
        "sums": (torch.rand(3, 4, generator=gen, dtype=torch.float64) * 2 - 1) * 5,
        "counts": torch.tensor([5.0, 0.0, 7.0], dtype=torch.float64),
        "norm_sum": torch.tensor(30.0, dtype=torch.float64),
    }
    for _ in range(2)
]
vectors = [statistics_vector(site, scale=10.0) for site in sites]
assert max(float(np.abs(v).max()) for v in vectors) <= 1.0  # inside the clipping range
summed = statistics_from_mean((vectors[0].astype(np.float64) + vectors[1]) / 2, 2, 3, 10.0)
assert torch.allclose(summed["sums"], sites[0]["sums"] + sites[1]["sums"], atol=1e-5)
assert summed["counts"].tolist() == [10.0, 0.0, 14.0]
assert abs(float(summed["norm_sum"]) - 60.0) < 1e-2
print("ok")
"""


@needs_flower
def test_shortened_waits_packed_records_and_statistics_vectors_in_the_flower_environment():
    done = subprocess.run(
        [str(flower_bin() / "python"), "-c", _CHECK_IN_FLOWER],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


@needs_flower
def test_the_site_runtime_explains_itself():
    done = subprocess.run(
        [str(flower_bin() / "python"), "-m", "pipelines.federated.flower_site_runtime", "-h"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "supernode" in done.stdout and "flower-supernode" in done.stdout


def test_the_superexec_connects_once_its_supernode_listens_and_not_after_it_died():
    """The SuperExec waits for the SuperNode's runtime API (looking every 20 ms) instead of
    entering Flower's 1-2-4 s connection back-off; it gives up when the SuperNode exits."""
    import os
    import socket
    import threading

    from pipelines.federated.flower_site_runtime import wait_until_listening

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = socket.socket()

    def listen_later() -> None:
        time.sleep(0.3)
        server.bind(("127.0.0.1", port))
        server.listen()

    threading.Thread(target=listen_later, daemon=True).start()
    started = time.monotonic()
    assert wait_until_listening(f"127.0.0.1:{port}", os.getpid(), timeout=10)
    assert 0.25 <= time.monotonic() - started < 1.0
    server.close()

    gone = subprocess.Popen(["true"])
    gone.wait()
    started = time.monotonic()
    assert not wait_until_listening(f"127.0.0.1:{port}", gone.pid, timeout=10)
    assert time.monotonic() - started < 1.0


def test_a_serverapp_whose_parent_died_exits_on_its_own(tmp_path: Path):
    """exit_when_orphaned: a process whose parent is SIGKILLed exits after its grace
    period, whatever it was doing (here: sleeping, as a blocked ServerApp would)."""
    import os
    import signal
    import sys

    from pipelines.workspaces import process_alive

    pid_file = tmp_path / "child.pid"
    child_code = (
        "import os, sys, time; sys.path.insert(0, sys.argv[1]);"
        "from pipelines.federated.flower_deploy import exit_when_orphaned;"
        "exit_when_orphaned(0.2); open(sys.argv[2], 'w').write(str(os.getpid()));"
        "time.sleep(120)"
    )
    parent_code = (
        "import subprocess, sys, time;"
        f"subprocess.Popen([sys.executable, '-c', {child_code!r}, sys.argv[1], sys.argv[2]]);"
        "time.sleep(120)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, str(REPO), str(pid_file)], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while process_alive(child):
            assert time.monotonic() < deadline, "the orphaned child is still running after 10 s"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


def _names(pids: list[int]) -> set[str]:
    """The names (``/proc/PID/comm``) of the processes ``pids`` that still run."""
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def _process_group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


@needs_flower
def test_a_loopback_site_is_one_process_group_that_the_host_forks(tmp_path: Path):
    """The loopback sites' host forks a site on request and answers its pid: the site's
    SuperNode and warm worker are one process group (so a kill of it is a crash of that
    site, all of it), each part named in ps, and the host exits when its requests end."""
    import json
    import os
    import signal

    from pipelines.federated.flower_deploy import ForkedProcess, free_port, node_config_text

    socket_path = tmp_path / "0.sock"
    config = {"site": "client_000", "client-index": 0, "shard": str(tmp_path / "shard.parquet")}
    request = {
        "index": 0,
        "socket": str(socket_path),
        "node_config": config,
        "threads": 1,
        "log": str(tmp_path / "supernode.log"),
        "worker_log": str(tmp_path / "worker.log"),
        "supernode_args": [
            "--insecure",
            "--superlink",
            f"127.0.0.1:{free_port()}",  # nobody there: the SuperNode keeps trying
            "--port",
            str(free_port()),
            "--node-config",
            node_config_text({**config, "worker": str(socket_path)}),
        ],
    }
    host = subprocess.Popen(
        [str(flower_bin() / "python"), "-m", "pipelines.federated.loopback_sites"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "host.log").open("w"),
        text=True,
        start_new_session=True,
    )
    try:
        host.stdin.write(json.dumps(request) + "\n")
        host.stdin.flush()
        answer = json.loads(host.stdout.readline())
        assert answer["index"] == 0
        site = ForkedProcess(answer["pid"])
        deadline = time.monotonic() + 120
        while not socket_path.exists():
            assert site.poll() is None, (tmp_path / "supernode.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the site's worker did not listen in 120 s"
            time.sleep(0.1)
        members = _process_group(answer["pid"])
        assert answer["pid"] in members and len(members) >= 2, members  # SuperNode, worker, ...
        # each part shows under its own name in ps (they are all forks of one Python)
        parts = {"supernode-0", "site-worker-0", "superexec", "app-zygote"}
        deadline = time.monotonic() + 30
        while not parts <= (names := _names(_process_group(answer["pid"]))):
            assert time.monotonic() < deadline, names
            time.sleep(0.1)
        site.kill()
        site.wait()
        deadline = time.monotonic() + 10
        while _process_group(answer["pid"]):
            assert time.monotonic() < deadline, _process_group(answer["pid"])
            time.sleep(0.05)
        host.stdin.close()
        assert host.wait(timeout=30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(host.pid, signal.SIGKILL)
