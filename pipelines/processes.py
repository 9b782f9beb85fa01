"""Small process helpers (Linux ``prctl``) shared by the parts that start or fork processes:
the warm stage runner and the Flower deployment."""

from __future__ import annotations

import signal
from collections.abc import Callable


def die_with_parent() -> Callable[[], None] | None:
    """The ``preexec_fn`` of the processes a run starts (SuperLink, SuperNodes, site
    workers, the warm stage runner and its stages): the kernel SIGKILLs the child when the
    process that started it dies, so a process killed by SIGKILL (an OOM kill, a preempted
    node) leaves nothing behind. None where there is no ``prctl`` (not Linux). The C
    function is looked up here, in the parent: the child only calls it (no import or lock
    between fork and exec)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    death_signal = int(signal.SIGKILL)

    def set_death_signal() -> None:
        prctl(1, death_signal)  # PR_SET_PDEATHSIG

    return set_death_signal


def name_process(name: str) -> None:
    """Show this process as ``name`` (its first 15 bytes) in ``ps``, ``top`` and
    ``/proc/PID/comm``: processes forked from one Python process (a site's SuperNode,
    SuperExec, zygote, ClientApps and worker; the stages of a warm stage runner) are told
    apart by it. Linux only (else nothing)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)  # PR_SET_NAME
