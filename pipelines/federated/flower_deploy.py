"""Run a federation on Flower's deployment engine: a loopback deployment, or an existing one.

:class:`LoopbackDeployment` starts a SuperLink and one SuperNode per client shard on this
machine (each SuperNode sees only its own shard), as a data site would start its own;
:func:`run_flower_job` submits the Flower app (``pipelines/federated/flower_app``) with a
run spec and waits for it. The Flower executables come from the Flower environment
(``.venv-flower``; ``$LEPTON_FLOWER_BIN`` to point elsewhere); nothing here imports ``flwr``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.errors import LeptonError

APP_DIR = Path(__file__).resolve().parent / "flower_app"
SECAGG_APP_DIR = Path(__file__).resolve().parent / "flower_app_secagg"
PROGRESS_FILE = "progress.jsonl"  # the ServerApp's history rows, one a round, as it goes
CONNECTION = "lepton"


class FlowerRuntimeError(LeptonError):
    """The Flower deployment could not start, or the run failed."""


def flower_bin() -> Path:
    """Folder of the Flower executables: ``$LEPTON_FLOWER_BIN`` or ``<repo>/.venv-flower/bin``."""
    if env := os.environ.get("LEPTON_FLOWER_BIN"):
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".venv-flower" / "bin"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise FlowerRuntimeError(f"{what} exited with code {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise FlowerRuntimeError(f"{what} did not listen on port {port} within {timeout:g} s")


class LoopbackDeployment:
    """A SuperLink and one SuperNode per shard, on 127.0.0.1, insecure (tests and demos).

    Use as a context manager; the processes stop on exit. ``home`` holds ``FLWR_HOME``
    (CLI connection config, installed apps) and the processes' logs.
    """

    def __init__(self, shards: list[Path], home: Path, bin_dir: Path | None = None):
        self.shards = [Path(s).resolve() for s in shards]
        self.home = Path(home)
        self.bin = bin_dir or flower_bin()
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """Environment of every Flower command of this deployment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIRFLOW"))}
        env.update(
            {
                "FLWR_HOME": str(self.home / "flwr"),
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{self.bin}:{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _start(self, argv: list[str], name: str) -> subprocess.Popen:
        log = (self.home / "logs" / f"{name}.log").open("w")
        process = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def __enter__(self) -> LoopbackDeployment:
        if not (self.bin / "flower-superlink").exists():
            raise FlowerRuntimeError(
                f"Flower is not installed in {self.bin} (run `make flower-setup`, or set "
                "$LEPTON_FLOWER_BIN)"
            )
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        (self.home / "flwr").mkdir(parents=True, exist_ok=True)
        (self.home / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        try:
            link = self._start(
                [
                    str(self.bin / "flower-superlink"),
                    "--insecure",
                    "--disable-runtime-dependency-installation",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                "superlink",
            )
            _wait_for_port(self.port, link, "flower-superlink")
            for index, shard in enumerate(self.shards):
                node_port = free_port()
                node = self._start(
                    [
                        str(self.bin / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{self.port}",
                        "--port",
                        str(node_port),
                        "--node-config",
                        f'client-index={index} shard="{shard}"',
                    ],
                    f"supernode_{index}",
                )
                _wait_for_port(node_port, node, f"flower-supernode {index}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process this deployment started (their process groups)."""
        import signal

        for process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        self.processes.clear()

    def logs(self, tail: int = 3000) -> str:
        """The end of every process log, for error messages."""
        parts = []
        for path in sorted((self.home / "logs").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text()[-tail:]}")
        return "\n".join(parts)


def _flwr(deployment: LoopbackDeployment, args: list[str], timeout: float = 120) -> str:
    done = subprocess.run(
        [str(deployment.bin / "flwr"), *args],
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise FlowerRuntimeError(f"flwr {' '.join(args[:2])} failed: {done.stdout}{done.stderr}")
    return done.stdout


class ProgressTail:
    """Calls ``on_row(row)`` once for each JSON line appended to ``path`` (the ServerApp's
    ``progress.jsonl``), as lines arrive; :meth:`poll` reads what is new."""

    def __init__(self, path: Path, on_row: Callable[[dict], None]):
        self.path, self.on_row, self.seen = Path(path), on_row, 0

    def poll(self) -> None:
        """Hand every complete line not seen yet to ``on_row``."""
        if not self.path.exists():
            return
        lines = self.path.read_text().split("\n")[:-1]  # the last piece may be half written
        for line in lines[self.seen :]:
            self.on_row(json.loads(line))
        self.seen = max(self.seen, len(lines))


def run_flower_job(
    deployment: LoopbackDeployment,
    spec_path: Path,
    timeout: float = 3600.0,
    app_dir: Path = APP_DIR,
    on_poll: Callable[[], None] | None = None,
) -> dict:
    """Submit the Flower app in ``app_dir`` with run spec ``spec_path``; wait until it ends,
    calling ``on_poll()`` every poll (about 2 s) and once at the end; return its row from
    ``flwr list``. A failed run raises with the run's log."""
    submitted = _flwr(
        deployment,
        [
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            f'spec="{Path(spec_path).resolve()}"',
            "--format",
            "json",
        ],
    )
    run_id = str(json.loads(submitted)["run-id"])
    started = time.monotonic()
    status = ""
    while time.monotonic() - started < timeout:
        listed = json.loads(
            _flwr(deployment, ["list", CONNECTION, "--run-id", run_id, "--format", "json"])
        )
        row = listed["runs"][0]
        status = str(row.get("status", ""))
        if on_poll is not None:
            on_poll()
        if status.startswith("finished:"):
            if status != "finished:completed":
                log = subprocess.run(
                    [str(deployment.bin / "flwr"), "log", run_id, CONNECTION, "--show"],
                    env=deployment.env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout
                raise FlowerRuntimeError(f"Flower run {run_id} {status}:\n{log[-4000:]}")
            return row
        time.sleep(2.0)
    raise FlowerRuntimeError(f"Flower run {run_id} still {status or 'pending'} after {timeout} s")
