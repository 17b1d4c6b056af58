"""How long the event loop was kept from running, and why (see `LoopWatch`)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time

log = logging.getLogger(__name__)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class LoopWatch:
    """How long the event loop was kept from running: every stage waits while it is blocked.

    Wakes every 50 ms and measures how late it woke. The worst delay since start and the number of delays over
    100 ms go to health.json, `status` and /metrics; a delay over 1 s is logged.

    The worst delay is also taken apart, from the kernel's accounting of the loop's thread (Linux schedstat):
    time the thread ran (the loop's own code: a callback that does too much), time it waited for a free core
    (the machine is busy), time it waited for block I/O (a write throttled by the kernel while the disk is busy;
    counted where `kernel.task_delayacct` is on), and the rest, time it slept although it was due (mostly the
    interpreter lock, held by another thread). Each needs a different cure, so the benchmark reports them all.
    """

    INTERVAL = 0.05

    def __init__(self) -> None:
        self.max_block = 0.0
        self.max_block_at = 0.0  # when it happened (epoch seconds), to compare with the log
        self.max_block_parts = {"running": 0.0, "waiting_for_cpu": 0.0, "waiting_for_io": 0.0, "other": 0.0}
        self.blocks_over_100ms = 0
        self.ticks = 0  # measurements taken (tests wait for the next one instead of sleeping)
        self.max_gc_pause = 0.0  # the longest garbage collection (it holds the interpreter lock throughout)
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.max_gc_pause = max(self.max_gc_pause, time.perf_counter() - self._gc_started)

    @staticmethod
    def _schedstat() -> tuple[int, int, int] | None:
        """(ns on a core, ns waiting for one, ns waiting for block I/O) of the calling thread, from Linux /proc.

        Block I/O waits are counted only where the kernel keeps them (`kernel.task_delayacct = 1`), else 0."""
        try:
            with open("/proc/thread-self/schedstat", "rb") as f:
                running, waiting, _ = f.read().split()
            with open("/proc/thread-self/stat", "rb") as f:
                blkio_ticks = int(f.read().rsplit(b")", 1)[1].split()[39])  # field 42: delayacct_blkio_ticks
            return int(running), int(waiting), blkio_ticks * 1_000_000_000 // _CLOCK_TICKS
        except (OSError, ValueError, IndexError):
            return None

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before, sched = loop.time(), self._schedstat()
            await asyncio.sleep(self.INTERVAL)
            late = loop.time() - before - self.INTERVAL
            if late > self.max_block:
                self.max_block, self.max_block_at = late, time.time()
                after = self._schedstat()
                if sched is not None and after is not None:
                    running, waiting, io = ((a - b) / 1e9 for a, b in zip(after, sched, strict=True))
                    self.max_block_parts = {
                        "running": running,
                        "waiting_for_cpu": waiting,
                        "waiting_for_io": io,
                        "other": max(0.0, late - running - waiting - io),  # the window is INTERVAL + late
                    }
            if late > 0.1:
                self.blocks_over_100ms += 1
                if late > 1.0:
                    log.warning("the event loop was blocked for %.1f s", late)
            self.ticks += 1
