"""One read model of what the gateway holds and does: `status` (CLI), the web page and check_mk all render this.

`read` gathers it once: the catalog's read model (`catalog.reporting`: transfers with their receipts and PACS
outcomes, studies, counts), the queues and what is set aside on D:, fragment groups, conflicts, unauthenticated
content against its quota, the address book, the last backup, and what the running gateway reports about itself
(`live`: its counters and mail-node health, handed in by the web page or read from `health.json` by the CLI and
check_mk; None when it is not running). Nothing here decides OK/WARN/CRIT (that is `monitoring`) or formats
anything (that is each renderer). No patient data: UIDs, counts, partners' names and addresses only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import backup
from gateway.core.queue import QueueState
from gateway.errors import ConfigError
from gateway.fragments import FragmentStore
from gateway.spool import Spool
from gateway.storage import Storage
from gateway.untrusted import holdings

if TYPE_CHECKING:
    from gateway.catalog import Catalog
    from gateway.config import Settings

WAITING = (QueueState.INCOMING, QueueState.ACTIVE, QueueState.DEFERRED)
ASIDE = (QueueState.HOLD, QueueState.CORRUPT)


@dataclass(frozen=True)
class QueueView:
    """One queue (outbox or inbox) on D:."""

    name: str
    counts: dict[str, int]  # items per state
    waiting: int  # incoming, active or deferred
    oldest_age: float  # seconds the oldest waiting item has waited
    held: int
    corrupt: int


@dataclass(frozen=True)
class HeldItem:
    """A mail set aside (held or corrupt) in one of the queues, with the reason an operator reads."""

    id: str
    queue: str
    state: str
    since: float | None
    reason: str
    content_dropped: str | None  # the quota dropped its bytes: only the record is left
    dropped_at: float | None
    traceback: str | None  # an internal error's traceback (a bug)


@dataclass
class Status:
    """Everything the three views show, read at `at`."""

    at: float
    name: str
    ae_title: str
    catalog_backend: str
    live: dict[str, Any] | None  # the running gateway's own report (None: not running or not heard from)
    catalog: dict[str, Any] = field(default_factory=dict)  # catalog.status(): transfers, studies, counts
    counts: dict[str, Any] = field(default_factory=dict)  # catalog.monitoring_counts()
    catalog_problem: str | None = (
        None  # the catalog could not be read (then `catalog` and `counts` are empty)
    )
    queues: dict[str, QueueView] = field(default_factory=dict)
    held: list[HeldItem] = field(default_factory=list)
    fragments: list[dict[str, object]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # files kept aside (same SOP Instance UID, other data)
    untrusted_bytes: int = 0  # unauthenticated content on D: (counts against mail.untrusted_quota)
    partners: list[dict[str, object]] = field(default_factory=list)
    backup_last: dict[str, Any] | None = None
    backup_sets: list[str] = field(default_factory=list)
    cluster: dict[str, Any] = field(
        default_factory=dict
    )  # a cluster's nodes, claims and Galera state (`_cluster`)

    def nodes(self) -> list[dict[str, Any]]:
        """Mail-node health as the running gateway last reported it: protocol, node, counts, last error."""
        out = []
        for proto, nodes in sorted(((self.live or {}).get("nodes") or {}).items()):
            for node, h in sorted(nodes.items()):
                last_ok, err_at = h.get("last_ok"), h.get("last_error_at")
                failing = err_at is not None and (last_ok is None or float(err_at) > float(last_ok))
                out.append({"protocol": proto, "node": node, **h, "failing": failing})
        return out

    def as_json(self) -> dict[str, Any]:
        """`status --json`: the catalog's keys at the top (as before this model existed), then the rest."""
        whole = asdict(self)
        catalog = whole.pop("catalog")
        return {**catalog, **whole, "nodes": self.nodes()}


def _queue(spool: Spool, name: str, now: float) -> QueueView:
    if not spool.root.exists():
        return QueueView(name, {}, 0, 0.0, 0, 0)
    waiting = [i for s in WAITING for i in spool.items(s)]
    counts = spool.counts()
    return QueueView(
        name,
        counts,
        len(waiting),
        max((now - float(i.meta.get("created", now)) for i in waiting), default=0.0),
        counts.get(QueueState.HOLD.value, 0),
        counts.get(QueueState.CORRUPT.value, 0),
    )


def _held(spool: Spool, name: str) -> list[HeldItem]:
    if not spool.root.exists():
        return []
    out = []
    for state in ASIDE:
        for item in spool.items(state):
            m = item.meta
            since = m.get("state_since")
            dropped_at = m.get("dropped_at")
            out.append(
                HeldItem(
                    item.id,
                    name,
                    state.value,
                    float(since) if since else None,
                    str(m.get("reason", "")),
                    str(m["content_dropped"]) if m.get("content_dropped") else None,
                    float(dropped_at) if dropped_at else None,
                    str(m["traceback"]) if m.get("traceback") else None,
                )
            )
    return out


def _partners(settings: Settings) -> list[dict[str, object]]:
    from gateway.addressbook import load_address_book

    try:
        return load_address_book(settings).expiry()
    except ConfigError as exc:  # a key problem shows in the status instead of stopping it
        return [{"partner": "-", "format": "-", "compression": "-", "receipts": False, "problem": str(exc)}]


def read_disk(settings: Settings, status: Status) -> None:
    """What D: and E: hold: queues, set-aside mails, fragments, conflicts, unauthenticated content, backups."""
    storage = Storage(settings.d_root)
    outbox, inbox = Spool(storage.outbox, storage.tmp), Spool(storage.inbox, storage.tmp)
    fragments = FragmentStore.of(storage)
    status.queues = {
        "outbox": _queue(outbox, "outbox", status.at),
        "inbox": _queue(inbox, "inbox", status.at),
    }
    status.held = _held(inbox, "inbox") + _held(outbox, "outbox")
    status.fragments = [g.describe(settings.mail.reassembly_deadline, status.at) for g in fragments.groups()]
    conflicts = storage.conflicts
    status.conflicts = sorted(f.name for f in conflicts.glob("*.dcm")) if conflicts.exists() else []
    status.untrusted_bytes = sum(h.size for h in holdings(inbox, fragments)) if inbox.root.exists() else 0
    status.backup_last = backup.last_outcome(settings)
    root = backup.backup_root(settings)
    status.backup_sets = (
        sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
        if root.exists()
        else []
    )


async def read(
    settings: Settings,
    catalog: Catalog | None = None,
    live: dict[str, Any] | None = None,
    limit: int = 50,
    now: float | None = None,
    partners: list[dict[str, object]] | None = None,
) -> Status:
    """Read the whole status once. `catalog`: the running gateway's (the web page); None opens one for this read.
    `live`: the running gateway's `Gateway.status()` (the web page) or its last `health.json` (CLI, check_mk).
    `partners`: the running gateway's address book; None reads it from the configuration."""
    from gateway.catalog import open_catalog

    status = Status(
        at=now or time.time(),
        name=settings.name,
        ae_title=settings.ae_title,
        catalog_backend=settings.database_url.split("://")[0],
        live=live,
    )
    own = None
    try:
        own = catalog or await open_catalog(settings.database_url)
        status.catalog = await own.status(limit)
        status.counts = await own.monitoring_counts(status.at, settings.mail.reassembly_deadline)
        if settings.cluster is not None:
            from gateway.cluster import cluster_view

            status.cluster = await cluster_view(own, settings.cluster.lease, status.at)
    except Exception as exc:  # reported as a state of its own: the rest of the status is still worth showing
        status.catalog_problem = f"catalog unreachable: {type(exc).__name__}"
    finally:
        if own is not None and catalog is None:
            await own.close()
    await asyncio.to_thread(read_disk, settings, status)
    status.partners = partners if partners is not None else await asyncio.to_thread(_partners, settings)
    return status
