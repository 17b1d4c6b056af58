"""Child processes never outlive the gateway.

A SIGKILLed gateway gets no chance to stop its DICOM receivers or its worker processes. Left running, a worker
would finish a mail into the outbox while the restarted gateway rebuilds the same transfer, and a receiver would
hold on to an association nobody indexes. Each child asks the kernel to kill it when its parent dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL this process when its parent dies (Linux); exit now if the parent (pid `parent`) already has."""
    expected = os.getppid() if parent is None else parent
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected:
        os._exit(1)
