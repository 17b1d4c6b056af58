"""What the pipeline stages share: the settings, D:, the catalog, the keys, the queues, and the events by which
one stage tells the next that there is work.

`Gateway.create` builds one `StageContext`; every stage takes it and reaches the shared parts through
`Stage`'s attributes, so adding a stage or a shared part does not mean threading it through every constructor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from gateway.cluster import Solo

if TYPE_CHECKING:
    from gateway.addressbook import Keys
    from gateway.auditing import Auditor
    from gateway.catalog import Catalog
    from gateway.config import Settings
    from gateway.fragments import FragmentStore
    from gateway.spool import Spool
    from gateway.storage import Storage


@dataclass(frozen=True)
class Wakes:
    """One event per stage that waits for work; setting it wakes that stage before its next tick."""

    router: asyncio.Event = field(default_factory=asyncio.Event)
    packager: asyncio.Event = field(default_factory=asyncio.Event)
    sender: asyncio.Event = field(default_factory=asyncio.Event)
    ingest: asyncio.Event = field(default_factory=asyncio.Event)
    forwarder: asyncio.Event = field(default_factory=asyncio.Event)
    receipts: asyncio.Event = field(default_factory=asyncio.Event)
    webindex: asyncio.Event = field(default_factory=asyncio.Event)

    def all(self) -> tuple[asyncio.Event, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class StageProgress:
    """Whether one stage is moving: `beat` whenever its loop looks for work (with whether it found some), `done`
    whenever it finished an item or a batch, whatever the outcome (stored, sent, deferred, set aside). A stage
    that has work and finished nothing for a while is stuck: a hung peer, a lock, a loop retrying one item."""

    last_done: float = field(default_factory=time.time)
    has_work: bool = False

    def beat(self, has_work: bool) -> None:
        if not has_work or not self.has_work:
            self.last_done = time.time()  # no work, or work just arrived: the stall clock starts now
        self.has_work = has_work

    def done(self) -> None:
        self.last_done = time.time()

    def idle(self) -> None:
        """The batch the stage found is finished: no work known until it looks again."""
        self.has_work = False
        self.last_done = time.time()

    def stalled(self, now: float, after: float) -> str | None:
        """Why the stage counts as stuck, or None."""
        if self.has_work and now - self.last_done > after:
            return f"it has work and finished nothing for {now - self.last_done:.0f} s"
        return None


@dataclass(frozen=True)
class Progress:
    """One `StageProgress` per stage that works through a queue (read by /healthz, health.json, check_mk)."""

    ingest: StageProgress = field(default_factory=StageProgress)
    packager: StageProgress = field(default_factory=StageProgress)
    sender: StageProgress = field(default_factory=StageProgress)
    forwarder: StageProgress = field(default_factory=StageProgress)
    receipts: StageProgress = field(default_factory=StageProgress)
    halted: dict[str, str] = field(default_factory=dict)  # stage loop → why a bug stopped it (see LoopGuard)

    def stalled(self, now: float, after: float) -> dict[str, str]:
        """Stage name → why it is stuck, for every stuck or halted stage."""
        found = {
            f.name: getattr(self, f.name).stalled(now, after) for f in fields(self) if f.name != "halted"
        }
        return {**{name: why for name, why in found.items() if why}, **self.halted}


@dataclass(frozen=True)
class StageContext:
    """Everything the stages share (one per running gateway)."""

    settings: Settings
    storage: Storage
    catalog: Catalog
    keys: Keys
    outbox: Spool
    inbox: Spool
    fragments: FragmentStore
    wakes: Wakes = field(default_factory=Wakes)
    progress: Progress = field(default_factory=Progress)
    audit: Auditor | None = None  # the audit trail (IHE ATNA); None in tests that do not look at it
    claims: Solo = field(default_factory=Solo)  # who works on what: this gateway alone, or a cluster node


class SharesContext:
    """The shared parts by name, for whatever holds a `ctx` (the stages, and the gateway that runs them)."""

    ctx: StageContext

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def storage(self) -> Storage:
        return self.ctx.storage

    @property
    def catalog(self) -> Catalog:
        return self.ctx.catalog

    @property
    def keys(self) -> Keys:
        return self.ctx.keys

    @property
    def outbox(self) -> Spool:
        return self.ctx.outbox

    @property
    def inbox(self) -> Spool:
        return self.ctx.inbox

    @property
    def fragments(self) -> FragmentStore:
        return self.ctx.fragments

    @property
    def wakes(self) -> Wakes:
        return self.ctx.wakes

    @property
    def progress(self) -> Progress:
        return self.ctx.progress

    @property
    def claims(self) -> Solo:
        return self.ctx.claims


class Stage(SharesContext):
    """Base of the pipeline stages."""

    def __init__(self, ctx: StageContext) -> None:
        from gateway.stages import LoopGuard

        self.ctx = ctx
        self.guard = LoopGuard(type(self).__name__.lower(), ctx.progress)  # its loop's errors: see LoopGuard

    async def work_loop(
        self, step: Callable[[], Awaitable[int]], wake: asyncio.Event, tick: float = 5
    ) -> None:
        """Run `step` for as long as the gateway runs: again at once while it finds work, else when `wake` is set
        or after `tick` seconds; its errors go through the guard (transient ones back off, a bug repeated five
        times stops the loop and reports the stage halted)."""
        from gateway.stages import wait_woken

        while True:
            try:
                done = await step()
                self.guard.ok()
            except Exception as exc:
                if not await self.guard.pause(exc):
                    return
                done = 0
            if not done:
                await wait_woken(wake, tick)
