"""Child processes that end with the process that started them, however it ended.

A launcher (``scls up``) that is SIGKILLed runs no clean-up: without help its children
(Redis, ingest, scheduler, workers, each in a session of its own) keep running, orphaned.
Linux delivers a chosen signal to a process when its parent dies (``PR_SET_PDEATHSIG``);
the setting survives ``execve``. :func:`tied_to_this_process` wraps a command so that it
starts through this module, which sets the signal and then execs the command itself (same
pid). SIGTERM by default: a worker drains as on any stop.

The kernel sends the signal when the *thread* that forked the child ends, not the process:
spawn from a thread that lives as long as the children should (the launcher's main thread).
Elsewhere than Linux the command runs unwrapped.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

#: ``PR_SET_PDEATHSIG`` from <linux/prctl.h>.
PR_SET_PDEATHSIG = 1


def tied_to_this_process(command: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """``command``, run so that it receives ``sig`` when the calling thread's process (its
    parent) dies."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-m", __name__, str(os.getpid()), str(int(sig)), "--", *command]


def main(argv: list[str]) -> None:
    """``python -m shared.core.lifeline PARENT_PID SIGNAL -- COMMAND...``: set the parent-death
    signal, then exec ``COMMAND``."""
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: python -m shared.core.lifeline PARENT_PID SIGNAL -- COMMAND [ARG...]")
    parent, sig, command = int(argv[0]), int(argv[1]), argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        sys.exit(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent:  # it died before the prctl: no signal will come
        sys.exit(128 + sig)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
