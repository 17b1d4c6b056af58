"""Who works on D:: the kernel lock a gateway holds on its volume (a cluster node: on its own part of it), and
where a gateway keeps what only it writes."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from gateway.errors import VolumeInUseError


def node_state(d_root: Path, node: str = "") -> Path:
    """Where a gateway keeps what only it writes (lock, health, GnuPG home, access log): `state/`, or a cluster
    node's `nodes/<node>/state/`."""
    return d_root / "nodes" / node / "state" if node else d_root / "state"


def hold_volume(d_root: Path, node: str = "") -> int:
    """Take the working volume for the life of this process, before anything on it is touched; returns the lock fd.

    Two gateways on one D: would send every mail twice and fight over queue items and the keyring, so a second
    one stops at start-up. The lock is the kernel's (flock on `state/gateway.lock`): a gateway that is killed
    releases it by dying, so a restart never finds a stale lock. The descriptor is not inherited by children.
    A cluster node holds its own part (`nodes/<node>/state`); who works on what shared is decided in the catalog.
    """
    state = node_state(d_root, node)
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / "gateway.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise VolumeInUseError(
            f"another gateway (pid {holder}) is running on {d_root}{f' as node {node}' if node else ''}; stop it"
            " first, or give this one another d_root"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_held(path: Path) -> bool:
    """Whether a gateway process holds this lock file (flock), i.e. is alive; False when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
