"""What the pipeline stages share: the settings, D:, the catalog, the keys, the queues, and the events by which
one stage tells the next that there is work.

`Gateway.create` builds one `StageContext`; every stage takes it and reaches the shared parts through
`Stage`'s attributes, so adding a stage or a shared part does not mean threading it through every constructor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.addressbook import Keys
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

    def all(self) -> tuple[asyncio.Event, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


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


class Stage(SharesContext):
    """Base of the pipeline stages."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
