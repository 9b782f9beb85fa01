"""A site's Flower runtime without Flower's fixed waits (runs in ``.venv-flower``).

Stock ``flower-supernode`` (flwr 1.41) waits 3 s whenever a pull from the SuperLink finds
no message (so every round's message waits up to 3 s after the SuperNode answered the
last one), polls for the ClientApp's reply every 0.5 s, and starts a new ``flwr-clientapp``
process, which imports Flower again, for every message. None of it is configurable. This
module runs the same SuperNode and the same ClientApp runtime with two changes:

- Flower's SuperNode (``flower-supernode``'s own entry point and flags) runs with its waits
  capped at ``--poll-seconds`` (default 0.05 s; :func:`shorten_flower_waits`), in process
  isolation next to a SuperExec that it forks itself, as the stock one starts its own.
- That SuperExec (Flower's loop) launches each ClientApp by forking a warm zygote that has
  already imported Flower and the Lepton app, instead of starting a process from scratch;
  each ClientApp still runs Flower's ``run_clientapp`` for exactly one message and exits.
  It connects once the SuperNode's runtime API listens (stock, it tries at once and backs
  off 1, 2, 4 s with jitter: 2-4 s of each site's start-up). The SuperNode, SuperExec,
  zygote and ClientApps are forks of one process that imported all of it once, and each
  dies with its parent.

    python -m pipelines.federated.flower_site_runtime supernode [--poll-seconds S] \\
        -- <flower-supernode flags>

The same SuperExec and zygote also run a loopback SuperLink's ServerApps
(``run_superexec(..., task="serverapp")``, forked by :mod:`pipelines.federated.loopback_sites`).

Everything else (TLS, SuperNode authentication, node config, the Fleet API and every
message) is Flower's own; a site may run stock ``flower-supernode`` instead (``lepton site
join --stock-supernode``) and get the same results more slowly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from pipelines.processes import name_process

DEFAULT_POLL_SECONDS = 0.05


class _CappedSleeps:
    """``time`` as a module sees it, except that ``sleep`` lasts at most ``ceiling`` s."""

    def __init__(self, ceiling: float):
        self.ceiling = ceiling

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, capped at the ceiling."""
        time.sleep(min(seconds, self.ceiling))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_flower_waits(seconds: float = DEFAULT_POLL_SECONDS) -> None:
    """Cap Flower's fixed waits in this process at ``seconds``: the SuperNode's message
    loop (3 s when a pull finds nothing, 0.5 s between looks for the ClientApp's reply) and
    the retries of an object pull that came before its object (1 s, doubling up to 10 s:
    now every ``seconds``; a ClientApp starts as soon as its message is there and its
    objects often come later, so its first wait cost about a second a message). A pull
    that finds nothing is retried until Flower's time limit for a pull (2 hours) instead of
    500 times: 500 short waits would give up on a large update from a slow site after
    25 s (stock Flower's doubling waits took over an hour to reach 500)."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal

    start_client_internal.time = _CappedSleeps(seconds)
    # pull_objects (a SuperNode's and a ServerApp's pulls) and the ClientApp's
    # pull_and_inflate_object_from_tree, which passes its own defaults on to pull_objects
    pulls = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    for pull in pulls:
        pull.__kwdefaults__["initial_backoff"] = seconds
        pull.__kwdefaults__["backoff_cap"] = seconds
        pull.__kwdefaults__["max_tries_per_object"] = None  # bounded by max_time instead


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``), else None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def import_site_runtime(poll_seconds: float) -> None:
    """Import what the SuperNode, its SuperExec and every ClientApp run, once, before any
    fork (so that each forked process starts with it), and shorten Flower's waits."""
    import flwr.supercore.superexec.run_superexec  # noqa: F401
    import flwr.supernode.cli.flower_supernode  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import httpcore  # noqa: F401 (each ClientApp's HTTP client imported it: 0.26 s a message)
    import safetensors.numpy  # noqa: F401

    import pipelines.federated.flower  # noqa: F401 (the app's code)
    import pipelines.federated.flower_secagg  # noqa: F401
    import pipelines.federated.site_steps  # noqa: F401 (what a ClientApp runs, or calls)
    import pipelines.federated.site_worker  # noqa: F401

    shorten_flower_waits(poll_seconds)


def run_supernode(supernode_argv: list[str], poll_seconds: float) -> None:
    """Run Flower's SuperNode with ``supernode_argv`` (``flower-supernode``'s flags; any
    ``--isolation`` is replaced by ``process``), its waits capped at ``poll_seconds``, with
    a forked SuperExec (:func:`run_superexec`) that dies with it."""
    import_site_runtime(poll_seconds)
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from pipelines.processes import die_with_parent as death_signal_setter

    argv = list(supernode_argv)
    isolation = [i for i, a in enumerate(argv) if a.startswith("--isolation")]
    for i in reversed(isolation):
        del argv[i : i + (1 if "=" in argv[i] else 2)]
    argv += ["--isolation", "process"]
    port = _flag_value(argv, "--port") or str(SUPERNODE_UVICORN_DEFAULT_PORT)
    host = _flag_value(argv, "--host") or UVICORN_DEFAULT_HOST
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 (a bind address)
    supernode = os.getpid()
    die_with_parent = death_signal_setter()  # looked up here, called after the fork
    if os.fork() == 0:  # before the SuperNode starts any thread
        try:
            name_process("superexec")
            if die_with_parent is not None:  # a SuperNode killed by SIGKILL takes it along
                die_with_parent()
            run_superexec(f"{host}:{port}", supernode, die_with_parent)
        finally:
            os._exit(0)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def _run_app(spec: dict[str, Any]) -> None:
    """Run the ClientApp or ServerApp task of one launch request, as ``flwr-clientapp`` or
    ``flwr-serverapp`` would (a ServerApp's output goes to the SuperLink's run log)."""
    if spec.get("task") == "serverapp":
        from queue import Queue

        from flwr.supercore.logger import mirror_output_to_queue, restore_output
        from flwr.superlink.runtime.run_serverapp import run_serverapp

        log_queue: Queue[str | None] = Queue()
        mirror_output_to_queue(log_queue)
        try:
            run_serverapp(
                runtime_api_address=spec["runtime_api_address"],
                log_queue=log_queue,
                token=spec["token"],
                insecure=True,
                parent_pid=spec["parent_pid"],
                runtime_dependency_install=False,
            )
        finally:
            restore_output()
        return
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    run_clientapp(
        runtime_api_address=spec["runtime_api_address"],
        token=spec["token"],
        insecure=True,
        parent_pid=spec["parent_pid"],
        runtime_dependency_install=False,
    )


def _zygote(read_fd: int, die_with_parent=None) -> None:
    """Fork one app process for each launch request (a JSON line on ``read_fd``); never
    returns. Single-threaded, so that forking is safe."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with os.fdopen(read_fd, "r") as requests:
        for line in requests:
            spec = json.loads(line)
            if os.fork() != 0:
                continue
            code = 0
            try:
                if die_with_parent is not None:
                    die_with_parent()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                name_process(spec.get("task", "clientapp"))
                _run_app(spec)
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 1
            except BaseException:  # noqa: BLE001 (the child must not return into the loop)
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    os._exit(0)


class _ForkExecutor:
    """SuperExec executor that hands each launch of its one task type (ClientApps at a
    SuperNode, ServerApps at a SuperLink) to the zygote."""

    def __init__(self, write_fd: int, task: str = "clientapp"):
        from flwr.supercore.constant import TaskType

        self.requests = os.fdopen(write_fd, "w", buffering=1)
        self.task = task
        self.task_type = TaskType.SERVER_APP if task == "serverapp" else TaskType.CLIENT_APP

    def get_eligible_capacity(self, supported_task_types, **_kwargs):
        """Its task type can launch now."""
        return {t for t in supported_task_types if t == self.task_type}, set()

    def wait_for_capacity(self, *_args, **_kwargs) -> None:
        """No capacity gate."""

    def launch(self, spec):
        """Ask the zygote to fork the ClientApp of ``spec``."""
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != self.task_type:
            return LaunchResult.failed(f"this SuperExec runs {self.task}s, not {spec.task_type}")
        self.requests.write(
            json.dumps(
                {
                    "task": self.task,
                    "runtime_api_address": spec.runtime_api_address,
                    "token": spec.token,
                    "parent_pid": spec.parent_pid,
                }
            )
            + "\n"
        )
        return LaunchResult.accepted()

    def close(self) -> None:
        """Stop the zygote (it exits when its pipe closes)."""
        self.requests.close()

    def reconcile(self) -> None:
        """Nothing to maintain."""


def wait_until_listening(address: str, parent_pid: int, timeout: float = 300.0) -> bool:
    """Wait until ``address`` (``host:port``) accepts TCP connections, looking every
    20 ms; False when process ``parent_pid`` exits or ``timeout`` s pass first. The
    SuperExec starts with its SuperNode: connecting before the SuperNode's runtime API
    listens sends it into Flower's connection back-off (1, 2, 4 s with jitter)."""
    from pipelines.federated.flower_deploy import listens

    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listens(host, int(port)):
            return True
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.02)
    return False


def run_superexec(
    runtime_api_address: str, parent_pid: int, die_with_parent=None, task: str = "clientapp"
) -> None:
    """Run Flower's SuperExec loop for ClientApps (``task="serverapp"``: ServerApps) on
    ``runtime_api_address`` (insecure, as the stock SuperNode's or SuperLink's own SuperExec
    on the same machine), launching each through a forked zygote; exits when process
    ``parent_pid`` (the SuperNode, or whoever started it) does."""
    from flwr.supercore.superexec import run_superexec as flower_superexec

    read_fd, write_fd = os.pipe()
    if os.fork() == 0:  # before any thread exists
        name_process("app-zygote")
        if die_with_parent is not None:
            die_with_parent()
        os.close(write_fd)
        _zygote(read_fd, die_with_parent)
    os.close(read_fd)
    executor = _ForkExecutor(write_fd, task)
    flower_superexec.get_executor = lambda *_args, **_kwargs: executor
    wait_until_listening(runtime_api_address, parent_pid)  # else Flower's own retries go on
    flower_superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def main(argv: list[str] | None = None) -> None:
    """``supernode`` (see the module's docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.federated.flower_site_runtime",
        description="Flower's SuperNode without its fixed waits, its ClientApps forked "
        "from a warm process.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    node = commands.add_parser(
        "supernode", help="run a SuperNode (flower-supernode's flags after --)"
    )
    node.add_argument(
        "--poll-seconds",
        type=float,
        default=DEFAULT_POLL_SECONDS,
        help=f"longest wait of the message loop (default {DEFAULT_POLL_SECONDS}; stock 3)",
    )
    node.add_argument("supernode_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    name_process("supernode")
    run_supernode(rest, args.poll_seconds)


if __name__ == "__main__":
    main()
