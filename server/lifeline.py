"""The server's child processes (vLLM's EngineCore and its Workers) die with it, even after a SIGKILL.

vLLM starts its engine core with multiprocessing, `fork` by default (CPU) and `spawn` where CUDA is up; a
SIGKILLed server cannot stop them, and they used to live on holding memory and cores. Linux's parent-death
signal does it from the child's side: `prctl(PR_SET_PDEATHSIG, SIGKILL)` asks the kernel to SIGKILL the
child when the thread that started it goes away.

NOTE: we do not control where vLLM starts its processes, so the hook goes where every Python child of
ours passes: `os.register_at_fork(after_in_child=...)` runs in each child a `fork` makes (vLLM's core and,
inherited with the interpreter state, the workers it forks in turn); a `spawn`ed child starts a fresh
interpreter that re-imports the main module (`effllm.cli.main`), which calls `die_with_parent` when it
sees it is one (`spawned_child`). Plain `subprocess` children do not run at-fork hooks (they exec at once),
so tools the server runs are not affected. The kernel ties the signal to the parent *thread*: vLLM is
started from the event loop's default executor, whose threads live as long as the server.
Invariant: installed once per process, before the engine starts; a no-op where prctl does not exist.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger("effllm.server.lifeline")

_PR_SET_PDEATHSIG = 1
_parent_pid = 0  # the pid that forks: recorded before each fork, read in the child
_installed = False


def die_with_parent(expected_parent: int = 0) -> bool:
    """SIGKILL this process when its parent dies; False where the platform cannot (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have died between the fork and the prctl: then no signal will ever come.
    if expected_parent and os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _before_fork() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_parent_pid)


def install() -> None:
    """Every child this process forks from now on dies with it (and so on down, for Python children)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _installed = True


def spawned_child() -> bool:
    """True while a multiprocessing `spawn` child re-imports the parent's main module. multiprocessing runs
    it as a fresh module named `__mp_main__` (the reason scripts need `if __name__ == "__main__":`); in
    any other process `sys.modules["__mp_main__"]` is `__main__` itself (multiprocessing/__init__.py)."""
    mp_main = sys.modules.get("__mp_main__")
    return mp_main is not None and mp_main is not sys.modules.get("__main__")
