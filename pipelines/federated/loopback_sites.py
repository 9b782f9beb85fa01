"""Every loopback site from one process that imported Flower, torch and the site code once
(runs in ``.venv-flower``).

A loopback deployment (``federate.runtime: flower`` without a SuperLink address) runs one
SuperNode and one warm worker per client shard on this machine. Started as separate
programs, each site imported Flower in its SuperNode and torch and Lightning in its worker:
two interpreters and about 10 CPU seconds of imports a site, all at once on a few cores.
This host imports all of it once and forks each site from itself, on request:

    python -m pipelines.federated.loopback_sites [--poll-seconds S]

reads one JSON request a line on stdin, ``{"index", "supernode_args", "node_config",
"socket", "threads", "log", "worker_log"}``, forks the site (a new session: the SuperNode
of :mod:`pipelines.federated.flower_site_runtime` with its SuperExec and ClientApp zygote,
and the :mod:`pipelines.federated.site_worker` it hands messages to) and answers
``{"index", "pid"}`` on stdout: SIGKILL of that process group takes the whole site down,
as a crash of the site would. Each site dies with the host, and the host with its parent.
A request ``{"index", "superlink", "log"}`` forks the SuperLink's SuperExec for ServerApps
instead (a SuperLink started with ``--isolation process``): the ServerApp, which imports
torch too, is then forked warm as well.
Remote sites run ``lepton site join`` instead, one process tree a site on its own machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from pipelines.federated.flower_site_runtime import DEFAULT_POLL_SECONDS
from pipelines.processes import name_process


def _import_sites(poll_seconds: float) -> None:
    """Import what a SuperNode, its ClientApps, a warm worker and the ServerApp run, once."""
    import flwr.superlink.runtime.run_serverapp  # noqa: F401

    import pipelines.config  # noqa: F401 - the ServerApp's own imports
    import pipelines.federated.flower_record  # noqa: F401
    import pipelines.federated.strategies  # noqa: F401
    import pipelines.models.encoder  # noqa: F401
    from pipelines.federated.flower_site_runtime import import_site_runtime
    from pipelines.federated.site_worker import import_site_steps

    import_site_runtime(poll_seconds)
    import_site_steps()


def _exit_after(run: Callable[[], None]) -> NoReturn:
    """In a forked child: call ``run``, then exit with its code (1 after an exception, whose
    traceback goes to the child's log), so that the child never returns into the host's
    loop."""
    code = 0
    try:
        run()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _run_serverapps(request: dict[str, Any], die_with_parent) -> NoReturn:
    """In the forked child: the SuperLink's SuperExec for ServerApps, each forked from this
    warm process (the loopback SuperLink runs with ``--isolation process``)."""
    from pipelines.federated.flower_site_runtime import run_superexec

    host = os.getppid()

    def superexec() -> None:
        os.setsid()
        name_process("superexec")
        _quiet_stdin()
        if die_with_parent is not None:
            die_with_parent()
        _to_log(request["log"])
        run_superexec(request["superlink"], host, die_with_parent, task="serverapp")

    _exit_after(superexec)


def _quiet_stdin() -> None:
    """Point stdin at /dev/null: the host's requests are not the child's."""
    quiet = os.open(os.devnull, os.O_RDONLY)
    os.dup2(quiet, 0)
    os.close(quiet)


def _to_log(path: str) -> None:
    """Send this process's stdout and stderr to ``path`` (appended)."""
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def _run_site(request: dict[str, Any], poll_seconds: float, die_with_parent) -> NoReturn:
    """In the forked site: start its worker, then run its SuperNode."""
    from pipelines.federated.flower_site_runtime import run_supernode
    from pipelines.federated.site_worker import serve

    def worker() -> None:
        name_process(f"site-worker-{request['index']}")
        if die_with_parent is not None:  # the worker goes with its SuperNode
            die_with_parent()
        _to_log(request["worker_log"])
        import torch

        torch.set_num_threads(int(request["threads"]))  # several sites share the cores
        serve(request["socket"], request["node_config"])

    def site() -> None:
        os.setsid()
        name_process(f"supernode-{request['index']}")
        _quiet_stdin()
        if die_with_parent is not None:
            die_with_parent()
        if os.fork() == 0:
            _exit_after(worker)
        _to_log(request["log"])
        run_supernode(list(request["supernode_args"]), poll_seconds)

    _exit_after(site)


def serve_sites(poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
    """Fork one site for each request line on stdin, answering its pid on stdout, until
    stdin closes (see the module's docstring)."""
    from pipelines.processes import die_with_parent as death_signal_setter

    name_process("lepton-sites")
    _import_sites(poll_seconds)
    die_with_parent = death_signal_setter()  # looked up here, called after the fork
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sites are reaped by the kernel
    print("loopback sites ready", file=sys.stderr, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the host ignores its children's
            if "superlink" in request:
                _run_serverapps(request, die_with_parent)
            _run_site(request, poll_seconds, die_with_parent)
        print(json.dumps({"index": request["index"], "pid": pid}), flush=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.federated.loopback_sites`` (see the module's docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.federated.loopback_sites",
        description="Fork loopback Flower sites (SuperNode and warm worker) from one "
        "process that imported Flower and torch once; one JSON request a line on stdin.",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=DEFAULT_POLL_SECONDS,
        help=f"longest wait of each SuperNode's message loop (default {DEFAULT_POLL_SECONDS})",
    )
    args = parser.parse_args(argv)
    serve_sites(args.poll_seconds)


if __name__ == "__main__":
    main()
