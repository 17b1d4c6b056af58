"""Pipeline stages: one module each, each a loop that never dies (claim, process, finish/defer/quarantine)."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_woken(event: asyncio.Event, timeout: float) -> None:
    """Sleep until another stage sets `event` or `timeout` passes; then clear it."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=timeout)
    event.clear()
