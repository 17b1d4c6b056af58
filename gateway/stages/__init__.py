"""Pipeline stages: one module each, each a loop that never dies (claim, process, finish/defer/quarantine)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

import pymysql

from gateway.core.smime import Identity

T = TypeVar("T")

log = logging.getLogger(__name__)


RECEIPT = "mdn"  # the `kind` of an outbox item that carries a receipt (every other item carries a study)


def is_receipt(meta: Mapping[str, object]) -> bool:
    """Whether an outbox item carries a receipt (an MDN) rather than a study."""
    return meta.get("kind") == RECEIPT


async def wait_woken(event: asyncio.Event, timeout: float) -> None:
    """Sleep until another stage sets `event` or `timeout` passes; then clear it."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout)
    event.clear()


# what "the database or the disk is away for a moment" looks like: worth retrying. Anything else (an illegal state
# move, a missing row, a bug) is not: it goes to the stage, which sets the item aside with its traceback.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    sqlite3.OperationalError,
    pymysql.err.OperationalError,
    pymysql.err.InterfaceError,
)


async def record(what: str, action: Callable[[], Awaitable[T]]) -> T:
    """Run a catalog update until it succeeds while the database is away (restarting, locked); any other error is
    raised at once, for the stage to set its item aside (never retried forever while /healthz says all is well).
    The disk already holds the truth."""
    delay = 1.0
    while True:
        try:
            return await action()
        except TRANSIENT_ERRORS as exc:
            log.warning("catalog update (%s) failed: %s; retrying in %.0f s", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)


_IDENTITIES: dict[tuple[str, str, float, float], Identity] = {}


def worker_identity(cert: Path, key: Path) -> Identity:
    """Our S/MIME identity in a worker process (keys cannot be sent between processes): loaded once, and again
    when the files change."""
    stamp = (str(cert), str(key), os.stat(cert).st_mtime, os.stat(key).st_mtime)
    if stamp not in _IDENTITIES:
        _IDENTITIES.clear()
        _IDENTITIES[stamp] = Identity.load(cert.read_bytes(), key.read_bytes())
    return _IDENTITIES[stamp]
