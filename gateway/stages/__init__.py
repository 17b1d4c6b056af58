"""Pipeline stages: one module each, each a loop that never dies (claim, process, finish/defer/quarantine)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def wait_woken(event: asyncio.Event, timeout: float) -> None:
    """Sleep until another stage sets `event` or `timeout` passes; then clear it."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout)
    event.clear()


async def record(what: str, action: Callable[[], Awaitable[object]]) -> None:
    """Run a catalog update until it succeeds (the database may be restarting); the disk already holds the truth."""
    delay = 1.0
    while True:
        try:
            await action()
            return
        except Exception as exc:
            log.warning("catalog update (%s) failed: %s; retrying in %.0f s", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)
