"""The warm stage runner: one process that has imported what the stages import and forks a
child for each ``lepton stage run``, so that a stage starts working at once.

A stage in a fresh process spends most of its time importing (``lepton stage run register``
on tiny params: about 6 s of MLflow, its SQLite store and torch before 2 s of work; pretrain
and federate add Lightning; ``benchmarks/stage_runner.py``). ``lepton run`` starts a runner
for the length of its run and passes its socket to the run's tasks in
``LEPTON_STAGE_RUNNER``; anyone can start one for their own ``dvc repro`` (``lepton stage
runner SOCKET``, then export the variable).

How a stage runs in it:

- the ``lepton stage run`` process that DVC starts (the client) connects to the socket and
  sends its arguments, working directory and environment, with its stdin, stdout and stderr
  (``SCM_RIGHTS``);
- the runner forks; the child takes them on, runs the stage as the client would have (the
  ``lepton`` command line, ``pipelines.cli.app``), its output going straight to the
  client's, and exits;
  the runner sends the client the child's exit status, and the client exits with it (killed
  by a signal: the client kills itself with the same signal);
- SIGTERM, SIGINT and SIGHUP to the client are passed on to the child; a client that dies
  (SIGKILL) closes its connection and the runner SIGKILLs the child's process group at once;
  the children die with the runner. A stage killed as DVC, Airflow or the kernel kill it
  stops as before, and its outputs are kept as before (:mod:`pipelines.atomic`);
- with ``LEPTON_STAGE_RUNNER`` unset, or nothing listening on it, the client runs the stage
  in its own process.

The runner never runs a stage's code itself (no torch op, no MLflow client, no thread), so
forking it is safe. It serves between its imports: a stage that comes early is forked at
once and imports what is still missing itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

RUNNER_ENV = "LEPTON_STAGE_RUNNER"
# what every stage imports (MLflow and its store; ingest's scikit-learn): at start
WARM_AT_START = (
    "pipelines.tracking",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "sklearn.datasets",
)
# then torch, Lightning and each stage's module, once a first stage has come: a run whose
# stages are all up to date (DVC starts none) costs no more than the imports above
WARM_AFTER_FIRST_STAGE = ("torch", "pipelines.models.systems")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_MESSAGE_BYTES = 1 << 20  # a request: argv, cwd and the environment
FORKED_BY_RUNNER = False  # True in a stage that a runner forked


def _message(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def _installation() -> dict[str, str]:
    """Which Python and which ``pipelines`` code this process runs: a runner serves only
    clients of the same installation."""
    import pipelines

    return {"python": sys.executable, "code": str(Path(pipelines.__file__).resolve().parent)}


def code_stamp(code_dir: str | Path) -> str:
    """Path, size and modification time of every ``.py`` file under ``code_dir``, hashed: a
    runner whose code changed since it imported it refuses stages (they run in their own
    process, on the new code)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(code_dir).rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _connect(socket_path: str) -> socket.socket | None:
    """A connection to the runner at ``socket_path``, or None when nothing listens there."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(socket_path)
    except OSError:
        connection.close()
        return None
    return connection


def answers(socket_path: str) -> bool:
    """Whether a runner listens at ``socket_path`` (``lepton run`` then uses that one
    instead of starting its own)."""
    connection = _connect(socket_path)
    if connection is None:
        return False
    connection.close()  # the runner drops a client that sent nothing
    return True


def run_in_runner(socket_path: str, argv: list[str]) -> int | None:
    """Run ``argv`` (``lepton stage run …``) in the runner at ``socket_path``, with this
    process's working directory, environment and standard streams. Returns the exit code,
    or None when no runner answers (the caller runs the stage itself). A stage killed by a
    signal kills this process with it."""
    connection = _connect(socket_path)
    if connection is None:
        return None
    with connection:
        request = {
            "argv": argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "installation": _installation(),
        }
        try:
            socket.send_fds(connection, [_message(request)], [0, 1, 2])
            started = connection.recv(_MESSAGE_BYTES)
        except OSError:  # e.g. an environment larger than a socket message
            return None
        if not started:  # the runner went away, or serves another installation
            return None
        pid = int(json.loads(started)["pid"])
        for forwarded in FORWARDED_SIGNALS:
            signal.signal(forwarded, lambda number, _frame: _signal_child(pid, number))
        ended = connection.recv(_MESSAGE_BYTES)
    if not ended:
        print(f"error: the stage runner at {socket_path} stopped during the stage", file=sys.stderr)
        return 1
    status = int(json.loads(ended)["status"])
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    return os.waitstatus_to_exitcode(status)


def _signal_child(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


class StageRunner:
    """The runner's side: a listening socket, a child per request, the child's exit status
    back to its client. One thread (the children are forked from it)."""

    def __init__(self, socket_path: str):
        from pipelines.processes import die_with_parent

        self.socket_path = socket_path
        self.pid = os.getpid()
        self.installation = _installation()
        self.code_stamp = code_stamp(self.installation["code"])
        self.threads_at_import = os.environ.get("OMP_NUM_THREADS", "")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(socket_path)
        self.listener.listen(64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.children: dict[int, socket.socket | None] = {}  # pid: its client's connection
        self.clients: dict[socket.socket, int | None] = {}  # connection: its child's pid
        self.forked = 0  # stages forked so far
        self.set_death_signal = die_with_parent()
        self.woken, self.wake = os.pipe()
        os.set_blocking(self.woken, False)
        os.set_blocking(self.wake, False)
        signal.set_wakeup_fd(self.wake)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector
        self.selector.register(self.woken, selectors.EVENT_READ)

    def serve_once(self, timeout: float | None) -> None:
        """Handle what is ready within ``timeout`` s: new clients, requests, clients that
        went away, children that ended."""
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.listener:
                connection, _ = self.listener.accept()
                self.clients[connection] = None
                self.selector.register(connection, selectors.EVENT_READ)
            elif key.fileobj == self.woken:
                while True:
                    try:
                        if not os.read(self.woken, 512):
                            break
                    except BlockingIOError:
                        break
            else:
                self._from_client(key.fileobj)
        self._reap()

    def _from_client(self, connection: socket.socket) -> None:
        pid = self.clients[connection]
        try:
            message, fds, _, _ = socket.recv_fds(connection, _MESSAGE_BYTES, 3)
        except OSError:
            message, fds = b"", []
        request = json.loads(message) if message else {}
        if pid is None and len(fds) == 3 and self._serves(request):
            self.clients[connection] = self._fork(request, fds, connection)
            return
        for fd in fds:
            os.close(fd)
        if pid is None or not message:  # refused, or the client went away (and its stage)
            self._drop(connection)
            if pid is not None:
                _kill_group(pid)

    def _serves(self, request: dict[str, Any]) -> bool:
        """Whether this runner may run ``request``: same Python and code, code unchanged."""
        if request.get("installation") != self.installation:
            return False
        if code_stamp(self.installation["code"]) != self.code_stamp:
            print(
                "pipelines/ changed since the runner started: stages run in their own process;"
                " restart the runner",
                file=sys.stderr,
                flush=True,
            )
            return False
        return True

    def _fork(self, request: dict[str, Any], fds: list[int], connection: socket.socket) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        # a signal the client passes on before the child has its own handlers waits for them
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        pid = os.fork()
        if pid == 0:
            try:
                self._become_stage(request, fds)
            finally:
                os._exit(70)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        with contextlib.suppress(OSError):  # the child may have done it first
            os.setpgid(pid, pid)
        for fd in fds:
            os.close(fd)
        self.children[pid] = connection
        self.forked += 1
        try:
            connection.send(_message({"pid": pid}))
        except OSError:  # the client is gone: so is its stage
            self.children[pid] = None
            _kill_group(pid)
        return pid

    def _become_stage(self, request: dict[str, Any], fds: list[int]) -> None:
        """In the child: take on the client's streams, directory and environment, run the
        stage as ``lepton`` would, exit with its code."""
        global FORKED_BY_RUNNER
        FORKED_BY_RUNNER = True
        os.setpgid(0, 0)  # the stage and what it starts: one group to kill
        if self.set_death_signal is not None:
            self.set_death_signal()
            if os.getppid() != self.pid:  # the runner died before that
                os._exit(70)
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGCHLD, *FORWARDED_SIGNALS):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        self.selector.close()
        self.listener.close()
        for connection in self.clients:
            connection.close()
        os.close(self.woken)
        os.close(self.wake)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _match_fresh_process(request["env"], self.threads_at_import)
        argv = list(request["argv"])
        sys.argv = argv
        from pipelines.processes import name_process

        name_process("lepton-" + (argv[3] if len(argv) > 3 else "stage"))
        os._exit(_run_cli(argv))

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            connection = self.children.pop(pid, None)
            if connection is not None:
                try:
                    connection.send(_message({"status": status}))
                except OSError:
                    pass
                self._drop(connection)

    def _drop(self, connection: socket.socket) -> None:
        if connection not in self.clients:
            return
        pid = self.clients.pop(connection)
        if pid is not None and self.children.get(pid) is connection:
            self.children[pid] = None  # still reaped; nobody to tell
        self.selector.unregister(connection)
        connection.close()

    def stop(self) -> None:
        """Kill the children still running and close the socket."""
        for pid in list(self.children):
            _kill_group(pid)
        self.listener.close()
        Path(self.socket_path).unlink(missing_ok=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _match_fresh_process(env: dict[str, str], threads_at_import: str) -> None:
    """What a fresh process would have set from ``env`` at start-up, where the runner set it
    from its own: torch's thread count (``OMP_NUM_THREADS``, read when torch loads),
    unbuffered output (``PYTHONUNBUFFERED``), NumPy's global random state (drawn from the OS
    in a fresh process; forked, every child would share the runner's)."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    threads = env.get("OMP_NUM_THREADS", "")
    if "torch" in sys.modules and threads.isdigit() and threads != threads_at_import:
        sys.modules["torch"].set_num_threads(int(threads))
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=sys.stdout.isatty(), write_through=unbuffered)
    sys.stderr.reconfigure(line_buffering=True, write_through=unbuffered)


def _run_cli(argv: list[str]) -> int:
    """Run the ``lepton`` command line ``argv`` here; its exit code."""
    import traceback

    from pipelines.cli import app

    code = 0
    try:
        app(args=argv[1:], prog_name="lepton")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException as error:  # as an uncaught exception ends a fresh process
        try:
            sys.excepthook(type(error), error, error.__traceback__)  # typer's, where it set one
        except Exception:
            traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def serve(socket_path: str) -> None:
    """Listen on ``socket_path`` and serve until SIGTERM: import :data:`WARM_AT_START` at
    once, and :data:`WARM_AFTER_FIRST_STAGE` and every stage's module once a first stage
    was forked, serving requests between imports. The socket is there from the start: a
    client that connects during an import waits in the backlog. After each group of
    imports the objects so far are frozen (``gc.freeze``), so that the children's garbage
    collections do not write to, and copy, the pages they share with the runner."""
    import gc

    from pipelines.processes import name_process
    from pipelines.registry import STAGES

    name_process("lepton-runner")
    runner = StageRunner(socket_path)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    stage_modules = tuple(stage.entry_point.split(":")[0] for stage in STAGES)
    groups = [  # (when, whether it waits for a first stage, what)
        ("at start", False, WARM_AT_START),
        ("after the first stage", True, (*WARM_AFTER_FIRST_STAGE, *stage_modules)),
    ]
    try:
        while not stopping:
            if groups and (not groups[0][1] or runner.forked):
                label, _, modules = groups.pop(0)
                started = time.perf_counter()
                for name in modules:
                    runner.serve_once(0)
                    if stopping:
                        return
                    import_module(name)
                gc.freeze()
                seconds = time.perf_counter() - started
                print(f"stage runner on {socket_path}: imports {label} took {seconds:.1f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
                continue
            runner.serve_once(1.0)
    finally:
        runner.stop()


@contextlib.contextmanager
def running(cwd: Path, env: dict[str, str], log_file: Path) -> Iterator[dict[str, str]]:
    """A stage runner (``lepton stage runner``) for the length of the block, started in
    ``cwd`` with ``env``, its output in ``log_file``. Yields the variables that send the
    block's stages to it: ``{}`` when it is not listening within 10 s (they then run in
    their own processes). Stopped (SIGTERM) at the end; it dies with this process."""
    from pipelines.processes import die_with_parent

    folder = tempfile.mkdtemp(prefix="lepton-runner-")  # short: socket paths have a limit
    socket_path = os.path.join(folder, "socket")
    lepton = Path(sys.executable).parent / "lepton"  # the console script: sys.path as stages
    command = [str(lepton)] if lepton.exists() else [sys.executable, "-m", "pipelines"]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            [*command, "stage", "runner", socket_path],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=die_with_parent(),
        )
    try:
        deadline = time.monotonic() + 10.0
        while not os.path.exists(socket_path) and process.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        yield {RUNNER_ENV: socket_path} if os.path.exists(socket_path) else {}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)
