"""Child processes never outlive the gateway.

A SIGKILLed gateway gets no chance to stop its DICOM receivers or its worker processes. Left running, a worker
would finish a mail into the outbox while the restarted gateway rebuilds the same transfer, a receiver would hold
on to an association nobody indexes, and every crash would leave its processes (and their memory) behind: the
kill test once piled up hundreds of idle workers until the machine ran out of memory.

- The DICOM receivers are the gateway's own children: the kernel kills them when it dies (PR_SET_PDEATHSIG).
- The mail workers are children of multiprocessing's forkserver, which lives as long as any of its children do,
  and they block on a queue whose both ends they hold themselves: neither ever notices on its own. Each worker
  watches the gateway's process through a pidfd and exits the moment it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux); exit now if the parent (pid `parent`) already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def exit_with(pid: int) -> None:
    """End this process (at once, without cleanup) when process `pid` ends; a daemon thread waits for it."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (OSError, AttributeError):  # no pidfd (old kernel): look every second
        threading.Thread(target=_poll, args=(pid,), name="exit-with", daemon=True).start()
        return
    threading.Thread(target=_wait, args=(pidfd,), name="exit-with", daemon=True).start()


def _wait(pidfd: int) -> None:
    select.select([pidfd], [], [])  # readable once the process has ended
    os._exit(1)


def _poll(pid: int) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass
        time.sleep(1)
