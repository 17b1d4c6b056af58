"""Pipeline stages: one module each, each a loop that never dies (claim, process, finish/defer/quarantine)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pymysql

from gateway.core.smime import Identity
from gateway.errors import PermanentError, TransientError

if TYPE_CHECKING:
    from gateway.stages.context import Progress

T = TypeVar("T")

log = logging.getLogger(__name__)


RECEIPT = "mdn"  # the `kind` of an outbox item that carries a receipt (every other item carries a study)


def is_receipt(meta: Mapping[str, object]) -> bool:
    """Whether an outbox item carries a receipt (an MDN) rather than a study."""
    return meta.get("kind") == RECEIPT


class Kind(StrEnum):
    """What an error means for the loop that caught it (`kind_of`)."""

    TRANSIENT = "transient"  # the database, the disk or a peer is away for a moment: retry with backoff
    PERMANENT = "permanent"  # retrying cannot help: the item it concerns is set aside with the reason
    BUG = "bug"  # nothing we expected: set aside with the traceback, and an alert


def kind_of(exc: BaseException) -> Kind:
    """The one classification of errors (the tree in `gateway.errors`, plus what the database and the OS raise
    when they are away for a moment)."""
    if isinstance(exc, (TransientError, *TRANSIENT_ERRORS)):
        return Kind.TRANSIENT
    if isinstance(exc, PermanentError):
        return Kind.PERMANENT
    return Kind.BUG


class LoopGuard:
    """What a stage's loop does when one of its turns fails (an item's own failure is set aside by the stage).

    Transient: log a warning and wait, doubling from `base` up to `cap`. Anything else at this level is a bug (a
    permanent error should have been handled with its item): log the traceback and back off the same way; after
    `MAX_BUGS` in a row the loop stops instead of retrying a bug forever, and the stage is reported halted
    (`Progress.halted`: /healthz answers 503, check_mk's "DMG Pipeline stages" goes CRIT) until the gateway is
    restarted. A turn that succeeds resets the count.
    """

    MAX_BUGS = 5

    def __init__(
        self, stage: str, progress: Progress | None = None, base: float = 1.0, cap: float = 60.0
    ) -> None:
        self.stage = stage
        self.progress = progress
        self.base = base
        self.cap = cap
        self.failures = 0
        self.bugs = 0

    def ok(self) -> None:
        self.failures = self.bugs = 0

    def failed(self, exc: BaseException) -> float | None:
        """Seconds to wait before the next turn, or None: stop the loop (the stage is reported halted). A loop
        being cancelled stops here: aiomysql turns a cancellation inside a query into an InterfaceError, which
        would otherwise look like the catalog being away and keep a cancelled stage running."""
        try:
            task = asyncio.current_task()
        except RuntimeError:  # not in an event loop (a test of the policy alone)
            task = None
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** min(self.failures - 1, 20))
        if kind_of(exc) is Kind.TRANSIENT:
            self.bugs = 0
            log.warning("%s: %s: %s; next try in %.0f s", self.stage, type(exc).__name__, exc, delay)
            return delay
        self.bugs += 1
        log.error("%s: unexpected %s (%d in a row)", self.stage, type(exc).__name__, self.bugs, exc_info=exc)
        if self.bugs < self.MAX_BUGS:
            return delay
        reason = f"halted by a bug: {type(exc).__name__} {self.bugs} times in a row (traceback in the log)"
        log.critical("%s %s; restart the gateway once it is fixed", self.stage, reason)
        if self.progress is not None:
            self.progress.halted[self.stage] = reason
        return None

    async def pause(self, exc: BaseException) -> bool:
        """`failed`, then wait that long: True to go on with the next turn, False when the loop must stop."""
        delay = self.failed(exc)
        if delay is None:
            return False
        await asyncio.sleep(delay)
        return True


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
