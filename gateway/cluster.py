"""This gateway as one node of a cluster (docs/cluster.md), or alone.

`Cluster` keeps the node's heartbeat in the shared catalog, the claims it holds (renewed with each beat), and the
singleton roles: stages that must run once across the cluster (routing, packaging, the mailbox fetch, PACS
forwards, receipts, the web index, housekeeping, the nightly backup) run on the node that holds their role and
move to another node when it dies. Sending and ingesting are claimed per mail, so every node does them. Items a
dead node left active are taken over once its lease has run out (the same crash story as a restart: back to
incoming, with the crash counted). `Solo` is the same interface for a gateway alone on its D: (the default): every
claim is granted and every role is held, so the stages read the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from gateway.catalog import Catalog, Claim
from gateway.config import ClusterSettings
from gateway.core.queue import QueueState, after_crash, is_due
from gateway.spool import Item, Spool
from gateway.volume import lock_held, node_state

log = logging.getLogger(__name__)

# stages that run on one node at a time, each under a claim of kind "role"
ROLES = ("route", "package", "fetch", "forward", "receipts", "webindex", "housekeeping", "backup")
# per-item claims: an outbound mail, an inbound mail, a fragment group's completion, a transfer's packaging (the
# package role's holder takes it per transfer: a node that lost the role while paused cannot package beside it)
SEND, INGEST, GROUP, PACKAGE = "send", "ingest", "group", "package"


class Solo:
    """A gateway alone on its D:: every claim is granted, every role held."""

    node = ""
    clustered = False

    async def take(self, kind: str, item: str) -> int | None:
        return 1

    async def release(self, kind: str, item: str) -> None:
        return None

    def mine(self, kind: str, item: str) -> bool:
        return True

    async def take_item(self, spool: Spool, kind: str, item: Item) -> Item | None:
        return item

    async def run_role(
        self,
        name: str,
        stage: Callable[[], Coroutine[Any, Any, Any]],
        on_take: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        await stage()

    def view(self) -> dict[str, Any]:
        return {}


class Cluster(Solo):
    """This node's membership: heartbeat, claims, roles; take-over of what dead nodes left."""

    clustered = True

    def __init__(self, settings: ClusterSettings, catalog: Catalog, spools: dict[str, Spool]) -> None:
        self.settings = settings
        self.node = settings.node
        self.catalog = catalog
        self.spools = spools  # claim kind → the queue its items are in (send: outbox, ingest: inbox)
        self.held: dict[tuple[str, str], int] = {}  # (kind, item) → fence
        # claims not given back because the catalog failed us (a member died under the statement): the heartbeat
        # renews every claim of ours, so such a claim would hold its item for ever; the next beat gives it back
        self.unreleased: dict[tuple[str, str], int | None] = {}
        self.valid_until = 0.0  # our claims count until then (the last renewal's lease, less one beat)
        self.last_ok = 0.0
        self.last_error = ""
        self.started = time.time()
        self.have = {r: asyncio.Event() for r in ROLES}
        self.gone = {r: asyncio.Event() for r in ROLES}
        self.counters: Callable[[], dict[str, Any]] = dict
        self.on_minority: Callable[[bool], None] = lambda _: None
        self.in_minority = False
        self.galera: dict[str, str] = {}
        self.wake: Callable[[str], None] = lambda _: None  # a take-over put items back: wake that stage
        self.taken_over = 0
        self.d_root: Path | None = None  # with `replay`: a dead node's intake journals are indexed here
        self.replay: Callable[[Path], Awaitable[int]] | None = None
        # with the lapsed claims of items no longer active: brings the catalog in line with the queues
        self.finish: Callable[[], Awaitable[int]] | None = None

    @property
    def healthy(self) -> bool:
        return time.time() < self.valid_until

    async def start(self) -> None:
        """Our previous run's claims are free at once (our lock on D: says that run is gone); first beat."""
        from gateway.stages import record

        freed = await record("cluster start", lambda: self.catalog.drop_claims(self.node))
        if freed:
            log.info("cluster: %d claims of this node's previous run freed", freed)
        await record("first heartbeat", self.beat)

    async def beat(self) -> None:
        """Renew our claims, say we are alive, take free roles, take over what dead nodes left."""
        now = time.time()
        claims = await self.catalog.heartbeat(
            self.node,
            socket.gethostname(),
            os.getpid(),
            self.started,
            now,
            self.settings.lease,
            self.counters(),
        )
        self.valid_until = now + self.settings.lease - self.settings.heartbeat
        self.last_ok, self.last_error = now, ""
        self.held = {(c.kind, c.item): c.fence for c in claims}
        await self._give_back(claims)
        for role in ROLES:
            if ("role", role) not in self.held:
                await self.take("role", role)
            self._role_state(role)
        self.galera = await self.catalog.galera()
        await self.take_over()

    def _role_state(self, role: str) -> None:
        if ("role", role) in self.held and self.healthy:
            if not self.have[role].is_set():
                log.info("cluster: node %s runs %s", self.node, role)
            self.gone[role].clear()
            self.have[role].set()
        else:
            if self.have[role].is_set():
                log.warning("cluster: node %s no longer runs %s", self.node, role)
            self.have[role].clear()
            self.gone[role].set()

    async def watch(self) -> None:
        """Stop every role the moment our claims are no longer certain, even while a heartbeat hangs on a stalled
        catalog (a Galera member waits for a dead peer's eviction): another node may take them after the lease."""
        while True:
            left = self.valid_until - time.time()
            await asyncio.sleep(left if left > 0 else self.settings.heartbeat / 4)
            if not self.healthy:
                for role in ROLES:
                    self._role_state(role)

    async def run_forever(self) -> None:
        """Beat every `heartbeat` seconds (and `watch`). Without the catalog, our claims lapse with the lease: every role stops;
        after `minority_grace` the DICOM port closes (the virtual IP moves to a node that can work)."""
        watch = asyncio.create_task(self.watch())
        try:
            await self._beat_forever()
        finally:
            watch.cancel()

    async def _beat_forever(self) -> None:
        while True:  # after a failed beat, the next comes sooner: the catalog may be back on another member
            await asyncio.sleep(self.settings.heartbeat / (4 if self.last_error else 1))
            try:
                await self.beat()
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                log.warning("cluster: heartbeat failed: %s", self.last_error)
                for role in ROLES:
                    self._role_state(role)  # stops each role once our lease is no longer certain
            minority = time.time() - self.last_ok > self.settings.minority_grace
            if minority != self.in_minority:
                self.in_minority = minority
                log.warning(
                    "cluster: catalog %s", "unreachable: closing the DICOM port" if minority else "back"
                )
                self.on_minority(minority)

    async def take(self, kind: str, item: str) -> int | None:
        if not self.healthy and kind != "role":
            return None
        try:
            fence = await self.catalog.take_claim(kind, item, self.node, time.time(), self.settings.lease)
        except BaseException:
            if kind != "role":  # it may have committed with its answer lost: nobody would work on the item
                self.unreleased[(kind, item)] = None
            raise
        if fence is not None:
            self.held[(kind, item)] = fence
            self.unreleased.pop((kind, item), None)  # an earlier take of it never committed after all
        return fence

    async def release(self, kind: str, item: str) -> None:
        fence = self.held.pop((kind, item), None)
        if fence is not None:
            try:
                await self.catalog.release_claim(kind, item, self.node, fence)
            except BaseException as exc:
                self.unreleased[(kind, item)] = fence  # given back by the next beat
                if not isinstance(exc, Exception):
                    raise

    async def _give_back(self, renewed: list[Claim]) -> None:
        """The claims a failed release or a take with a lost answer left behind, given back now (a claim that
        is not ours any more, or never was, is forgotten)."""
        fences = {(c.kind, c.item): c.fence for c in renewed}
        for key, fence in list(self.unreleased.items()):
            if key in fences and fence in (None, fences[key]):
                await self.catalog.release_claim(key[0], key[1], self.node, fences[key])
                self.held.pop(key, None)
                log.info("cluster: claim on %s %s given back after a failed release", *key)
            del self.unreleased[key]

    def mine(self, kind: str, item: str) -> bool:
        return (kind, item) in self.held and self.healthy

    async def take_item(self, spool: Spool, kind: str, item: Item) -> Item | None:
        """Claim a queued item listed as due, and look at it again: another node may have finished it between
        the listing and the claim. The item as it is now, or None (claimed elsewhere, or no longer due)."""
        if await self.take(kind, item.id) is None:
            return None
        current = await asyncio.to_thread(spool.find, item.id)
        if current is None or not is_due(current.state, current.meta, time.time()):
            await self.release(kind, item.id)
            return None
        return current

    async def take_over(self) -> int:
        """Items left ACTIVE by a node whose claim lapsed (it died or lost the catalog): claimed, and put back as
        after a crash (incoming, the crash counted; set aside after too many)."""
        moved = 0
        for kind, spool in self.spools.items():
            active = await asyncio.to_thread(spool.items, QueueState.ACTIVE)
            if not active:
                continue
            now = time.time()
            live = {c.item for c in await self.catalog.claims(kind) if c.lease_until >= now}
            for item in active:
                if item.id in live or await self.take(kind, item.id) is None:
                    continue
                try:
                    current = await asyncio.to_thread(spool.find, item.id)
                    if current is not None and current.state is QueueState.ACTIVE:
                        new, meta = after_crash(current.meta)
                        await asyncio.to_thread(spool.move, current, new, **meta, taken_over_by=self.node)
                        log.warning("cluster: %s %s left active by a lapsed node: now %s", kind, item.id, new)
                        moved += 1
                finally:
                    await self.release(kind, item.id)
            if moved:
                self.wake(kind)
        self.taken_over += moved
        await self._finish_lapsed()
        await self._adopt_journals()
        return moved

    async def _finish_lapsed(self) -> None:
        """A node that died after an item's last step on disk and before the catalog's record of it (a mail the
        server took is done in the queue, still queued in the catalog) left a lapsed claim on an item no longer
        active; nobody would ever record it. Such claims are taken and dropped, then `finish` brings the catalog
        in line with the queues, as a start does (and the audit trail gets the transfers it completes)."""
        if self.finish is None:
            return
        now, dropped = time.time(), 0
        for kind, spool in self.spools.items():
            for claim in await self.catalog.claims(kind):
                if claim.node == self.node or claim.lease_until >= now:
                    continue
                current = await asyncio.to_thread(spool.find, claim.item)
                if current is not None and current.state is QueueState.ACTIVE:
                    continue  # put back by the take-over (after it, nobody else's claim lapsed on it)
                if await self.take(kind, claim.item) is not None:
                    await self.release(kind, claim.item)
                    dropped += 1
        if dropped:
            fixed = await self.finish()
            log.warning(
                "cluster: %d lapsed claims of items no longer active dropped; %d recorded", dropped, fixed
            )

    async def _adopt_journals(self) -> None:
        """A node that died acknowledged instances its catalog may not have indexed yet: its intake journals
        (`D:/nodes/<node>/intake/`) are replayed here once its heartbeat is older than the lease and its lock on
        D: is free (indexing is idempotent, so a node that comes back and replays them too does no harm)."""
        if self.replay is None or self.d_root is None:
            return
        now = time.time()
        for row in await self.catalog.cluster_nodes():
            node = str(row["node"])
            if node == self.node or float(row["heartbeat"]) + self.settings.lease >= now:
                continue
            folder = self.d_root / "nodes" / node
            journals = sorted((folder / "intake").glob("journal*.jsonl"))
            if not journals or lock_held(node_state(self.d_root, node) / "gateway.lock"):
                continue
            if await self.take("journal", node) is None:
                continue
            try:
                count = sum([await self.replay(journal) for journal in journals])
                log.warning(
                    "cluster: node %s is down; its intake journals (%d records) indexed here", node, count
                )
            finally:
                await self.release("journal", node)

    async def run_role(
        self,
        name: str,
        stage: Callable[[], Coroutine[Any, Any, Any]],
        on_take: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """Run `stage` while this node holds the role; cancel it when the role is lost; `on_take` first each time
        the role comes (to finish what the last holder left)."""
        while True:
            await self.have[name].wait()
            if on_take is not None:
                await on_take()
            task: asyncio.Task[Any] = asyncio.create_task(stage(), name=name)
            lost = asyncio.create_task(self.gone[name].wait())
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
            lost.cancel()
            if task.done():
                task.result()  # a stage ends only by an error; the TaskGroup shows it
                return
            while not task.done():  # a cancellation swallowed by a library call is repeated until it ends
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
            log.info("cluster: %s stopped on this node", name)

    def view(self) -> dict[str, Any]:
        """This node's part of `status` (no patient data)."""
        return {
            "node": self.node,
            "roles": sorted(r for r in ROLES if self.have[r].is_set()),
            "claims": len(self.held),
            "healthy": self.healthy,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "minority": self.in_minority,
            "taken_over": self.taken_over,
            "galera": self.galera,
        }


async def cluster_view(catalog: Catalog, lease: float, now: float) -> dict[str, Any]:
    """The whole cluster as the catalog shows it: each node (alive while its heartbeat is younger than the lease,
    its roles, how many claims it holds, its counters), claims waiting for take-over (their holder's lease ran
    out), and the Galera member's view (members in the Primary Component)."""
    claims = await catalog.claims()
    nodes = []
    for row in await catalog.cluster_nodes():
        mine = [c for c in claims if c.node == row["node"]]
        nodes.append(
            {
                **row,
                "alive": now - float(row["heartbeat"]) <= lease,
                "roles": sorted(c.item for c in mine if c.kind == "role" and c.lease_until >= now),
                "claims": len(mine),
            }
        )
    lapsed = [c for c in claims if c.lease_until < now]
    return {
        "nodes": nodes,
        "lapsed_claims": len(lapsed),
        "unheld_roles": sorted(
            set(ROLES) - {c.item for c in claims if c.kind == "role" and c.lease_until >= now}
        ),
        "galera": await catalog.galera(),
    }
