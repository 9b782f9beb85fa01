"""Run a federation on Flower's deployment engine: a loopback deployment, or an existing one.

:class:`LoopbackDeployment` starts a SuperLink and one SuperNode per client shard on this
machine (each SuperNode sees only its own shard), as a data site would start its own;
:class:`RemoteFederation` points at a SuperLink that already runs elsewhere
(``federation.superlink``, TLS with ``federation.root_certificates``), whose SuperNodes the
sites started with ``lepton site join``.

:func:`package_app` copies the Flower app (``pipelines/federated/flower_app``) with the run
spec and its start weights inside (``run_spec.json``: a FAB carries ``.json`` files, so
they reach the ServerApp wherever the SuperLink runs), and :func:`run_flower_job` submits it
and waits. The ServerApp reports on its own output, which Flower forwards to ``flwr log``:
one ``LEPTON-PROGRESS`` line of JSON a round, and one ``LEPTON-RESULT`` line at the end
(history, per-site metrics, the final weights); nothing comes back through the file system,
so a remote run and a loopback run take the same path. The Flower executables come from
the Flower environment (``.venv-flower``; ``$LEPTON_FLOWER_BIN`` to point elsewhere);
nothing here imports ``flwr``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import LeptonError
from pipelines.processes import die_with_parent

if TYPE_CHECKING:
    from pipelines.checkpoints import Checkpoint

APP_DIR = Path(__file__).resolve().parent / "flower_app"
RUN_SPEC_FILE = "run_spec.json"  # inside the app's package: the spec and its blobs (base64)
PROGRESS_MARK = "LEPTON-PROGRESS "  # + one JSON history row, printed by the ServerApp a round
RESULT_MARK = "LEPTON-RESULT "  # + the run's result (JSON), printed once at the end
CHECKPOINT_MARK = "LEPTON-CHECKPOINT "  # + {"round", "data"}: a round's checkpoint (base64)
FAB_MAX_BYTES = 10 * 1024 * 1024  # flwr refuses a bigger app bundle
CONNECTION = "lepton"

log = logging.getLogger(__name__)


class FlowerRuntimeError(LeptonError):
    """The Flower deployment could not start or be reached, or the run failed."""


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


def exit_when_orphaned(grace_seconds: float = 5.0) -> None:
    """Exit this process ``grace_seconds`` after its parent dies (a thread that watches).
    The ServerApp calls it: stock Flower starts it under a SuperExec and only raises SIGINT
    in it when that SuperExec goes; on a loaded machine its graceful exit, which tries to
    reach the SuperLink that went first, could outlive a killed stage by more than a minute.
    Without its SuperLink a ServerApp has nothing left to do."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        time.sleep(grace_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()


def listens(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host``:``port`` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        return probe.connect_ex((host, port)) == 0


def log_tail(path: Path, chars: int = 2000) -> str:
    """The last ``chars`` characters of the log at ``path`` ("" when it is not there), to
    quote in an error about the process that wrote it."""
    try:
        return Path(path).read_text()[-chars:]
    except OSError:
        return ""


def wait_for_port(
    port: int, process: subprocess.Popen | ForkedProcess, what: str, timeout: float = 60.0
) -> None:
    """Return once something listens on 127.0.0.1:``port``; raise if ``process`` exits first
    or ``timeout`` passes."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise FlowerRuntimeError(f"{what} exited with code {process.returncode}")
        if listens("127.0.0.1", port):
            return
        time.sleep(0.1)
    raise FlowerRuntimeError(f"{what} did not listen on port {port} within {timeout:g} s")


def flower_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """Environment of a Flower command: ``FLWR_HOME`` under ``home``, no update check, no
    runtime dependency installation, SuperExec polling every 0.1 s, this deployment's
    executables first on ``PATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIRFLOW"))}
    env.update(
        {
            "FLWR_HOME": str(Path(home) / "flwr"),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # SuperExec looks for new tasks every second by default: ask every 0.1 s
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": env.get(
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"
            ),
            "PATH": f"{bin_dir}:{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass(frozen=True)
class TLSFiles:
    """A SuperLink's TLS files (PEM): the CA certificate, its own certificate and key."""

    ca_certificate: Path
    certificate: Path
    key: Path

    def superlink_args(self) -> list[str]:
        """``flower-superlink`` flags that serve its APIs over TLS with these files."""
        return [
            "--ssl-ca-certfile",
            str(self.ca_certificate),
            "--ssl-certfile",
            str(self.certificate),
            "--ssl-keyfile",
            str(self.key),
        ]


def start_superlink(
    bin_dir: Path,
    port: int,
    log_path: Path,
    env: dict[str, str],
    tls: TLSFiles | None = None,
    host: str = "127.0.0.1",
    supernode_auth: bool = False,
    own_superexec: bool = False,
) -> subprocess.Popen:
    """Start ``flower-superlink`` (one port for the Fleet, Control and ServerApp APIs), TLS
    with ``tls`` else insecure; ``supernode_auth`` admits only SuperNodes whose public key
    was registered (``flwr supernode register``; needs TLS); ``own_superexec``: it starts no
    SuperExec for ServerApps (``--isolation process``), the caller runs one. Returns once it
    listens."""
    argv = [
        str(bin_dir / "flower-superlink"),
        *(tls.superlink_args() if tls else ["--insecure"]),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if supernode_auth:
        argv.append("--enable-supernode-auth")
    if own_superexec:
        argv += ["--isolation", "process"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        argv,
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    wait_for_port(port, process, "flower-superlink")
    return process


def start_site_worker(
    python: Path,
    socket_path: Path,
    node_config: dict[str, Any],
    log_path: Path,
) -> subprocess.Popen:
    """Start a site's warm worker (:mod:`pipelines.federated.site_worker`) with ``python``
    (the Flower environment's) on ``socket_path``; returns once it listens."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            str(python),
            "-m",
            "pipelines.federated.site_worker",
            str(socket_path),
            json.dumps(node_config),
        ],
        stdout=log_path.open("a"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    wait_for_worker(process, socket_path, log_path)
    return process


def wait_for_worker(
    process: subprocess.Popen | ForkedProcess, socket_path: Path, log_path: Path
) -> None:
    """Return once the warm worker ``process`` listens on ``socket_path``; raises (quoting
    its log) if it exits first or takes over 120 s."""
    started = time.monotonic()
    while not Path(socket_path).exists():
        if process.poll() is not None:
            raise FlowerRuntimeError(
                f"the site worker exited ({process.returncode}): {log_tail(log_path)}"
            )
        if time.monotonic() - started > 120:
            raise FlowerRuntimeError(
                f"the site worker did not listen on {socket_path} within 120 s"
            )
        time.sleep(0.1)


def site_runtime_argv(bin_dir: Path, poll_seconds: float | None = None) -> list[str]:
    """The start of a SuperNode's command line, before its ``flower-supernode`` flags: Flower's
    SuperNode with short waits and forked ClientApps
    (:mod:`pipelines.federated.flower_site_runtime`), from the Flower environment in
    ``bin_dir``."""
    polls = [] if poll_seconds is None else ["--poll-seconds", f"{poll_seconds:g}"]
    return [
        str(Path(bin_dir) / "python"),
        "-m",
        "pipelines.federated.flower_site_runtime",
        "supernode",
        *polls,
        "--",
    ]


def node_config_text(config: dict[str, Any]) -> str:
    """A node config for ``--node-config``: ``key="text" key=number ...``."""
    return " ".join(
        f"{key}={value}" if isinstance(value, int) else f'{key}="{value}"'
        for key, value in config.items()
    )


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (newest first), then SIGKILL what is still up after 20 s."""
    for process in reversed(processes):
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                process.kill()
            process.wait()


class FlowerDeployment:
    """Where ``flwr run`` submits: a SuperLink's address and how to trust it.

    ``home`` holds ``FLWR_HOME`` (the CLI's connection config, installed apps) and logs.
    """

    def __init__(
        self,
        home: Path,
        address: str,
        root_certificates: Path | None = None,
        bin_dir: Path | None = None,
        connect_timeout: float = 30.0,
    ):
        self.home = Path(home)
        self.address = address
        self.root_certificates = root_certificates
        self.bin = bin_dir or flower_bin()
        self.connect_timeout = connect_timeout

    @property
    def env(self) -> dict[str, str]:
        """Environment of every Flower command of this deployment."""
        return flower_env(self.home, self.bin)

    def write_connection(self) -> None:
        """``$FLWR_HOME/config.toml``: the one connection ``lepton`` (TLS with the root
        certificate, else insecure)."""
        (self.home / "flwr").mkdir(parents=True, exist_ok=True)
        trust = (
            f'root-certificates = "{Path(self.root_certificates).resolve()}"\n'
            if self.root_certificates
            else "insecure = true\n"
        )
        (self.home / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\n{trust}'
        )

    def ready(self) -> None:
        """Return once the deployment can run a round (a remote federation: at once; the
        ServerApp waits for its sites)."""

    def check_installed(self, executable: str = "flwr") -> None:
        """Raise when the Flower executables are not where this deployment looks."""
        if not (self.bin / executable).exists():
            raise FlowerRuntimeError(
                f"Flower is not installed in {self.bin} (run `make flower-setup`, or set "
                "$LEPTON_FLOWER_BIN)"
            )

    def flwr(self, args: list[str], timeout: float | None = None) -> str:
        """Run ``flwr ARGS`` against this deployment; its stdout, or a FlowerRuntimeError
        that names the SuperLink when it cannot be reached."""
        timeout = timeout if timeout is not None else self.connect_timeout + 90.0
        try:
            done = subprocess.run(
                [str(self.bin / "flwr"), *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise FlowerRuntimeError(
                f"flwr {args[0]}: no answer from the SuperLink at {self.address} within "
                f"{timeout:g} s"
            ) from None
        if done.returncode != 0:
            said = (done.stdout + done.stderr).strip()
            if "unavailable" in said.lower() or "connect" in said.lower():
                raise FlowerRuntimeError(
                    f"the SuperLink at {self.address} cannot be reached "
                    f"(federation.superlink): {said[-600:]}"
                )
            raise FlowerRuntimeError(f"flwr {' '.join(args[:2])} failed: {said[-3000:]}")
        return done.stdout

    def __enter__(self) -> FlowerDeployment:
        self.check_installed()
        self.write_connection()
        return self

    def __exit__(self, *exc) -> None:
        pass


class RemoteFederation(FlowerDeployment):
    """A SuperLink that runs elsewhere (``federation.superlink``), with the sites' SuperNodes
    connected to it; nothing is started here."""

    def __init__(self, federation, home: Path, bin_dir: Path | None = None):
        certificates = federation.root_certificates
        if certificates is not None and not Path(certificates).is_file():
            raise FlowerRuntimeError(f"federation.root_certificates: no such file: {certificates}")
        super().__init__(
            home,
            federation.superlink,
            Path(certificates) if certificates else None,
            bin_dir,
            federation.connect_timeout_seconds,
        )

    def __enter__(self) -> RemoteFederation:
        super().__enter__()
        self.flwr(["list", CONNECTION, "--format", "json"], timeout=self.connect_timeout + 5)
        return self


class LoopbackDeployment(FlowerDeployment):
    """A SuperLink and one SuperNode per shard, on 127.0.0.1, insecure (tests and demos).

    Use as a context manager; the processes stop on exit. SuperNode ``i`` gets the node
    config ``site="client_00i" client-index=i shard="<its shard>"`` and a warm worker that
    holds its shard and torch (``worker="<socket>"``, :mod:`pipelines.federated.site_worker`);
    with ``site_state``, the folder where the site keeps what outlives a run
    (``state="<site_state>/client_00i"``: its record-level DP accountants). Every site is
    forked from one host process that imported Flower, torch and the site code once
    (:mod:`pipelines.federated.loopback_sites`), as is the SuperLink's SuperExec, which forks
    each ServerApp warm. The sites start on entry; :meth:`ready` waits for them.
    """

    def __init__(
        self,
        shards: list[Path],
        home: Path,
        bin_dir: Path | None = None,
        site_state: Path | None = None,
    ):
        import tempfile

        self.port = free_port()
        super().__init__(home, f"127.0.0.1:{self.port}", None, bin_dir)
        self.shards = [Path(s).resolve() for s in shards]
        self.processes: list[subprocess.Popen] = []
        self.sites: dict[int, int] = {}  # shard index -> pid of its site's process group
        self.host: subprocess.Popen | None = None
        self.superexec: ForkedProcess | None = None  # the SuperLink's, for ServerApps
        self._answers: dict[int, int] = {}
        self.site_state = Path(site_state).resolve() if site_state is not None else None
        self._site_waits: list[Callable[[], None]] = []
        # Unix socket paths must stay short: a private folder under the system's temp dir
        self.sockets = Path(tempfile.mkdtemp(prefix="lepton-sites-"))

    def __enter__(self) -> LoopbackDeployment:
        self.check_installed("flower-superlink")
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.write_connection()
        try:
            self.host = subprocess.Popen(
                [str(self.bin / "python"), "-m", "pipelines.federated.loopback_sites"],
                env={**self.env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=(logs / "sites.log").open("a"),
                text=True,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
            self.processes.append(self.host)
            self.processes.append(  # while the host imports
                start_superlink(
                    self.bin,
                    self.port,
                    logs / "superlink.log",
                    self.env,
                    own_superexec=True,
                )
            )
            self._request(  # the SuperLink's SuperExec: ServerApps forked warm too
                {"index": -1, "superlink": self.address, "log": str(logs / "superexec.log")}
            )
            # every site starts now; ready() waits for them (the host imports torch and flwr
            # once, which overlaps with submitting the run)
            self._site_waits = [
                self.start_node(index, wait=False) for index in range(len(self.shards))
            ]
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> None:
        """Return once every SuperNode and warm worker listens; raises (naming the process
        and quoting its log) if one exited or did not start in time."""
        try:
            while self._site_waits:
                self._site_waits.pop(0)()
            if self.superexec is None:
                self.superexec = ForkedProcess(self._forked_pid(-1))
            if self.superexec.poll() is not None:
                said = log_tail(self.home / "logs" / "superexec.log")
                raise FlowerRuntimeError(f"the SuperLink's SuperExec exited: {said}")
        except BaseException:
            self.stop()
            raise

    def _request(self, request: dict[str, Any]) -> None:
        """Send the host one request (a site, or the SuperLink's SuperExec)."""
        self.host.stdin.write(json.dumps(request) + "\n")
        self.host.stdin.flush()

    def _forked_pid(self, index: int) -> int:
        """The pid of what the host forked for request ``index`` (a site's process group, or
        the SuperExec at -1), once it has."""
        while index not in self._answers:
            line = self.host.stdout.readline()
            if not line:
                said = log_tail(self.home / "logs" / "sites.log")
                raise FlowerRuntimeError(
                    f"the loopback sites' host exited ({self.host.wait()}): {said}"
                )
            answer = json.loads(line)
            self._answers[int(answer["index"])] = int(answer["pid"])
        return self._answers.pop(index)

    def start_node(self, index: int, wait: bool = True) -> Callable[[], None]:
        """Start the SuperNode of shard ``index`` and its warm worker (again, after
        :meth:`kill_node`); returns once both listen (``wait``), else at once with the
        function that waits for them."""
        config: dict[str, Any] = {
            "site": f"client_{index:03d}",
            "client-index": index,
            "shard": str(self.shards[index]),
        }
        if self.site_state is not None:  # what the site keeps across runs (its accountants)
            config["state"] = str(self.site_state / config["site"])
        socket_path = self.sockets / f"{index}.sock"
        socket_path.unlink(missing_ok=True)
        node_port = free_port()
        logs = self.home / "logs"
        request = {
            "index": index,
            "socket": str(socket_path),
            "node_config": config,
            "threads": max(1, (os.cpu_count() or 1) // len(self.shards)),  # sharing the cores
            "log": str(logs / f"supernode_{index}.log"),
            "worker_log": str(logs / f"worker_{index}.log"),
            "supernode_args": [
                "--insecure",
                "--superlink",
                self.address,
                "--port",
                str(node_port),
                "--node-config",
                node_config_text({**config, "worker": str(socket_path)}),
            ],
        }
        self._request(request)

        def wait_for_site() -> None:
            pid = self.sites[index] = self._forked_pid(index)
            site = ForkedProcess(pid)
            wait_for_worker(site, socket_path, logs / f"worker_{index}.log")
            wait_for_port(node_port, site, f"flower-supernode {index}")

        if wait:
            wait_for_site()
        return wait_for_site

    def kill_node(self, index: int) -> None:
        """SIGKILL the SuperNode of shard ``index``, its ClientApps and its worker, as a
        crash of the site would."""
        site = ForkedProcess(self.sites.pop(index))
        site.kill()
        site.wait()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every site (its process group), then the host and the SuperLink."""
        for pid in self.sites.values():
            ForkedProcess(pid).terminate()
        self.sites.clear()
        if self.host is not None and self.host.stdin is not None:
            with contextlib.suppress(OSError):
                self.host.stdin.close()
        stop_processes(self.processes)
        self.processes.clear()
        shutil.rmtree(self.sockets, ignore_errors=True)


class ForkedProcess:
    """What :func:`wait_for_port` and :func:`wait_for_worker` need of a process that another
    process forked (a loopback site): whether it is still up, and its process group's end."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """None while the process runs, else -1 (its parent reaps it, not this one)."""
        from pipelines.workspaces import process_alive

        if not process_alive(self.pid):
            self.returncode = -1
        return self.returncode

    def kill(self) -> None:
        """SIGKILL its process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM its process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait until it is gone (up to ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return -1


def encode_blob(data: bytes) -> str:
    """Bytes as base64 text (weights and tables inside the run spec and the result)."""
    return base64.b64encode(data).decode("ascii")


def decode_blob(text: str) -> bytes:
    """The bytes :func:`encode_blob` wrote."""
    return base64.b64decode(text.encode("ascii"))


def weights_blob(module) -> bytes:
    """A torch module's weights as safetensors bytes (the start weights of a run spec)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


def package_app(
    app_dir: Path, work_dir: Path, spec: dict[str, Any], blobs: dict[str, bytes]
) -> Path:
    """Copy the Flower app in ``app_dir`` to ``work_dir/app`` with ``spec`` and ``blobs``
    (start weights, the val table) in its package's ``run_spec.json``; return the copy.
    Raises when the bundle would exceed Flower's 10 MiB limit."""
    target = Path(work_dir) / "app"
    shutil.copytree(app_dir, target, ignore=shutil.ignore_patterns("__pycache__"))
    package = next(p for p in target.iterdir() if (p / "__init__.py").exists())
    document = json.dumps({"spec": spec, "blobs": {k: encode_blob(v) for k, v in blobs.items()}})
    size = len(document.encode()) + sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    if size > FAB_MAX_BYTES * 0.95:
        sizes = ", ".join(f"{k} {len(v) / 1e6:.1f} MB" for k, v in blobs.items())
        raise FlowerRuntimeError(
            f"the run spec is {size / 1e6:.1f} MB ({sizes}); a Flower app bundle holds at most "
            f"{FAB_MAX_BYTES / 1e6:.1f} MB"
        )
    (package / RUN_SPEC_FILE).write_text(document)
    return target


def read_run_spec(package_dir: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The ServerApp's side of :func:`package_app`: ``(spec, blobs)``."""
    document = json.loads((Path(package_dir) / RUN_SPEC_FILE).read_text())
    return document["spec"], {k: decode_blob(v) for k, v in document["blobs"].items()}


def report_progress(row: dict[str, Any]) -> None:
    """ServerApp: one history row, on its output (forwarded to ``flwr log``)."""
    print(PROGRESS_MARK + json.dumps(row), flush=True)


def report_result(result: dict[str, Any]) -> None:
    """ServerApp: the run's result, once, at the end."""
    print(RESULT_MARK + json.dumps(result), flush=True)


class RelayedCheckpoint:
    """The ServerApp's side of the stage's round checkpoints: it loads what the workspace
    sent in the run spec (``resume``: the bytes of its checkpoint file, or None) and saves
    each round by printing it (``flwr log`` carries it to the workspace, which writes it
    into its own checkpoint file: :class:`RunLog`). Quacks like
    :class:`~pipelines.checkpoints.Checkpoint` for the round loop."""

    path = "the workspace's checkpoint, sent in the run spec"

    def __init__(self, resume: bytes | None, owner: str | None = None):
        self.resume, self.owner = resume, owner

    def load(self):
        """``(tensors, meta)`` of the workspace's checkpoint, or None."""
        from pipelines.checkpoints import checkpoint_from_bytes

        return None if self.resume is None else checkpoint_from_bytes(self.resume)

    def save(self, tensors, meta: dict[str, Any]) -> None:
        """Send the round's checkpoint to the workspace (one marked line)."""
        from pipelines.checkpoints import checkpoint_bytes

        data = encode_blob(checkpoint_bytes(tensors, meta, self.owner))
        print(CHECKPOINT_MARK + json.dumps({"round": meta["round"], "data": data}), flush=True)


class RunLog:
    """Reads the ServerApp's marked lines out of ``flwr log`` output: each progress row
    once (``on_row``), each round's checkpoint once (``on_checkpoint(bytes)``, in round
    order) and the result when it is there. Feed it line by line as a stream arrives
    (:meth:`feed_line`), or the whole log so far again and again (:meth:`feed`)."""

    def __init__(
        self,
        on_row: Callable[[dict], None] | None = None,
        on_checkpoint: Callable[[bytes], None] | None = None,
    ):
        self.on_row, self.seen, self.result = on_row, 0, None
        self.on_checkpoint, self.checkpoint_round = on_checkpoint, 0
        self._count = 0

    def feed_line(self, line: str) -> bool:
        """Take one line; False when it is a progress line cut short (stop reading there)."""
        if (at := line.find(PROGRESS_MARK)) >= 0:
            try:
                row = json.loads(line[at + len(PROGRESS_MARK) :])
            except json.JSONDecodeError:  # a line not fully forwarded yet
                return False
            self._count += 1
            if self._count > self.seen:
                self.seen = self._count
                if self.on_row is not None:
                    self.on_row(row)
        elif (at := line.find(RESULT_MARK)) >= 0:
            try:
                self.result = json.loads(line[at + len(RESULT_MARK) :])
            except json.JSONDecodeError:
                return False
        elif (at := line.find(CHECKPOINT_MARK)) >= 0:
            try:
                saved = json.loads(line[at + len(CHECKPOINT_MARK) :])
            except json.JSONDecodeError:
                return False
            if int(saved["round"]) > self.checkpoint_round:
                self.checkpoint_round = int(saved["round"])
                if self.on_checkpoint is not None:
                    self.on_checkpoint(decode_blob(saved["data"]))
        return True

    def feed(self, text: str) -> None:
        """Take the whole log so far: rows already handed over are not handed over again."""
        self._count = 0
        for line in text.splitlines():
            if not self.feed_line(line):
                break


def _open_stream(deployment: FlowerDeployment, run_id: str) -> subprocess.Popen:
    """Start ``flwr log RUN`` (it streams the run's log until the run ends)."""
    return subprocess.Popen(
        [str(deployment.bin / "flwr"), "log", run_id, CONNECTION],
        env=deployment.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )


def _follow_stream(
    deployment: FlowerDeployment,
    run_id: str,
    follow: RunLog,
    timeout: float,
    process: subprocess.Popen | None = None,
) -> None:
    """Feed every line of ``flwr log RUN`` (``process`` when already started, else a new
    one) to ``follow``, up to the result line (the ServerApp's last act; the run's end comes
    a second or two later, after Flower flushes its logs and the stream's next look); the
    stream stops on return."""
    import threading

    process = process or _open_stream(deployment, run_id)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        for line in process.stdout:
            follow.feed_line(line.rstrip("\n"))
            if follow.result is not None:
                break
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()


def run_flower_job(
    deployment: FlowerDeployment,
    app_dir: Path,
    on_row: Callable[[dict], None] | None = None,
    timeout: float = 3600.0,
    on_checkpoint: Callable[[bytes], None] | None = None,
) -> dict[str, Any]:
    """Submit the packaged Flower app ``app_dir`` (:func:`package_app`), follow its log as
    it streams (each progress row to ``on_row``, each round's checkpoint to
    ``on_checkpoint``, as they arrive) and return the result the ServerApp reported. A
    failed run raises with the end of its log."""
    submitted = deployment.flwr(["run", str(app_dir), CONNECTION, "--format", "json"])
    try:
        run_id = str(json.loads(submitted)["run-id"])
    except (json.JSONDecodeError, KeyError):
        raise FlowerRuntimeError(f"flwr run did not start a run: {submitted[-2000:]}") from None
    # the log client starts while the deployment's processes still import (a core is idle
    # then), not after, when its own start-up would slow the ServerApp's first exchanges
    stream = _open_stream(deployment, run_id)
    try:
        deployment.ready()
    except BaseException:
        stream.kill()
        stream.wait()
        raise
    started = time.monotonic()
    follow = RunLog(on_row, on_checkpoint)
    _follow_stream(deployment, run_id, follow, timeout, stream)
    if follow.result is not None:  # the ServerApp's last act: the run completed
        return follow.result
    status = ""
    while time.monotonic() - started < timeout:  # the stream ends with the run, or breaks
        listed = json.loads(
            deployment.flwr(["list", CONNECTION, "--run-id", run_id, "--format", "json"])
        )
        status = str(listed["runs"][0].get("status", ""))
        if status.startswith("finished:"):
            break
        time.sleep(1.0)
        _follow_stream(deployment, run_id, follow, timeout - (time.monotonic() - started))
    else:
        raise FlowerRuntimeError(
            f"Flower run {run_id} still {status or 'pending'} after {timeout} s"
        )
    text = ""
    for _ in range(5):  # the last lines may reach the log just after the run ends
        if follow.result is not None or status != "finished:completed":
            break
        time.sleep(1.0)
        text = deployment.flwr(["log", run_id, CONNECTION, "--show"])
        follow.feed(text)
    if status != "finished:completed" or follow.result is None:
        text = text or deployment.flwr(["log", run_id, CONNECTION, "--show"])
        raise FlowerRuntimeError(f"Flower run {run_id} {status}:\n{text[-4000:]}")
    return follow.result


def open_deployment(
    federation, shards: list[Path], home: Path, site_state: Path | None = None
) -> FlowerDeployment:
    """The deployment a run goes to: the remote federation when ``federation.superlink`` is
    set, else a loopback deployment with one SuperNode per shard (each keeping its state
    under ``site_state``)."""
    if federation.remote:
        return RemoteFederation(federation, home)
    return LoopbackDeployment(shards, home, site_state=site_state)


def run_federated_job(
    federation,
    shards: list[Path],
    app_dir: Path,
    spec: dict[str, Any],
    blobs: dict[str, bytes],
    work_dir: Path,
    on_row: Callable[[dict], None] | None = None,
    deployment: FlowerDeployment | None = None,
    checkpoint: Checkpoint | None = None,
    site_state: Path | None = None,
) -> dict[str, Any]:
    """Package ``app_dir`` with ``spec`` and ``blobs``, run it on the federation's
    deployment (:func:`open_deployment`, or ``deployment`` when given, already started) and
    write the final weights the ServerApp sent to ``work_dir/out/model.{safetensors,json}``;
    return its result (``history``, ``sites``).

    With a ``checkpoint`` the ServerApp resumes from it when it holds a round (its bytes
    travel in the bundle as the ``resume`` blob) and sends back every round's checkpoint,
    which is written into it (:class:`RelayedCheckpoint`): a rerun after a kill resumes."""
    import contextlib

    sites = federation.sites if federation.remote else len(shards)
    spec = {**spec, "num_clients": sites, "site_wait_seconds": federation.site_wait_seconds}
    on_checkpoint = None
    if checkpoint is not None:
        spec["checkpoint"] = {"owner": checkpoint.owner}
        on_checkpoint = checkpoint.save_bytes
        if (saved := checkpoint.read_bytes()) is not None:
            from pipelines.checkpoints import checkpoint_meta

            blobs = {**blobs, "resume": saved}
            done = checkpoint_meta(saved)["round"]
            log.info("resuming after round %d (%s)", done, checkpoint.path)
    app = package_app(app_dir, work_dir, spec, blobs)
    started = (
        contextlib.nullcontext(deployment)
        if deployment is not None
        else open_deployment(federation, shards, work_dir / "home", site_state)
    )
    with started as deployment:
        where = (
            f"the SuperLink at {deployment.address} ({sites} sites)"
            if federation.remote
            else f"a loopback SuperLink + {sites} SuperNodes on 127.0.0.1"
        )
        log.info("Flower run on %s", where)
        result = run_flower_job(deployment, app, on_row, on_checkpoint=on_checkpoint)
    out = work_dir / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(decode_blob(result.pop("weights")))
    (out / "model.json").write_text(json.dumps(result["model_config"]))
    return result
