"""The running gateway: one `asyncio.TaskGroup` owns every stage; start-up recovers what a crash left.

    receive (SCP threads) ─▶ index ─▶ route ─▶ package ─▶ send ─▶ SMTP cluster
    POP3S/IMAPS cluster ─▶ fetch ─▶ ingest ─▶ storage + catalog ─▶ forward ─▶ PACS
                                      └─▶ receipts (MDN) ─▶ send

Start-up order: storage layout and stray temp files, catalog and migrations, intake journal replay, spool
clean-up, then the stages, and the DICOM port last (nothing is acknowledged before the pipeline can take it).
Shutdown: the DICOM port closes first, then the stages are cancelled; everything they had acknowledged is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import backup, metrics, monitoring
from gateway.adapters.imap import ImapCluster
from gateway.adapters.mailbox import Mailbox
from gateway.adapters.pop3 import Pop3Cluster
from gateway.adapters.smtp import SmtpCluster
from gateway.addressbook import load_keys
from gateway.audit import AuditForwarder, AuditTrail, Repository
from gateway.auditing import Auditor
from gateway.catalog import open_catalog
from gateway.cluster import INGEST, SEND, Cluster, Solo
from gateway.config import Node, Settings
from gateway.core.nodepool import NodePool
from gateway.fragments import FragmentStore
from gateway.loopwatch import LoopWatch
from gateway.reconcile import catalog_from_queues, storage_against_catalog
from gateway.renderers import RenderWorkers
from gateway.spool import Spool
from gateway.stages import record
from gateway.stages.context import SharesContext, StageContext
from gateway.stages.fetch import Fetcher
from gateway.stages.forward import Forwarder, purge_accepted
from gateway.stages.ingest import Ingester
from gateway.stages.package import Packager
from gateway.stages.receipts import Receipts
from gateway.stages.receive import Intake
from gateway.stages.receivers import ReceiverPool
from gateway.stages.route import Router
from gateway.stages.send import Sender
from gateway.stages.webindex import WebIndexer
from gateway.storage import Storage
from gateway.tls import mail_client_context
from gateway.volume import hold_volume
from gateway.web import WebApp

log = logging.getLogger(__name__)

DONE_KEEP_DAYS = 7  # sent and ingested queue items are kept this long for `queue` and audits


@dataclass
class Gateway(SharesContext):
    """All stages of one gateway, wired together through one `StageContext`."""

    ctx: StageContext
    intake: Intake
    scp: ReceiverPool
    router: Router
    packager: Packager
    sender: Sender
    fetcher: Fetcher
    ingester: Ingester
    forwarder: Forwarder
    receipts: Receipts
    webindex: WebIndexer
    renderers: RenderWorkers
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    audit_wake: asyncio.Event = field(default_factory=asyncio.Event)  # new audit records: send them now
    storage_report: dict[str, int] = field(default_factory=dict)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    loop_watch: LoopWatch = field(default_factory=LoopWatch)
    audit_forwarder: AuditForwarder | None = None
    volume_lock: int = -1  # the kernel lock on D: (or this node's part of it), held until `close`

    @classmethod
    async def create(cls, settings: Settings) -> Gateway:
        """Build every stage and recover the state a previous run left."""
        lock = hold_volume(settings.d_root, settings.node)  # first: before anything on D: is touched
        storage = Storage(settings.d_root, settings.min_free, settings.min_free_inodes, settings.node)
        removed = storage.prepare()
        if removed:
            log.info("removed %d temp files left by an interrupted write", removed)
        keys = await asyncio.to_thread(load_keys, settings)
        catalog = await open_catalog(settings.database_url)
        tls = mail_client_context(settings.mail)
        outbox, inbox = Spool(storage.outbox, storage.tmp), Spool(storage.inbox, storage.tmp)
        outbox.prepare()
        inbox.prepare()
        fragments = FragmentStore.of(storage, settings.max_inbound_message)
        fragments.prepare()
        mailbox: Mailbox = (ImapCluster if settings.mail.protocol == "imap" else Pop3Cluster)(
            settings.mail, tls
        )
        auditor = Auditor(AuditTrail(settings.audit_dir, settings.name), settings, storage.root)
        claims: Solo = Solo()
        if settings.cluster is not None:
            claims = Cluster(settings.cluster, catalog, {SEND: outbox, INGEST: inbox})
            await claims.start()  # before anything else is touched: our last run's claims are free now
        ctx = StageContext(
            settings, storage, catalog, keys, outbox, inbox, fragments, audit=auditor, claims=claims
        )
        intake = Intake(storage, catalog, ctx.wakes.router, ctx.progress, ctx.wakes.webindex)
        intake.audit = auditor
        await intake.recover()
        gw = cls(
            ctx=ctx,
            intake=intake,
            scp=ReceiverPool(settings, storage, intake, settings.dicom_workers),
            router=Router(ctx),
            packager=Packager(ctx),
            sender=Sender(ctx, SmtpCluster(settings.mail, tls)),
            fetcher=Fetcher(ctx, mailbox),
            ingester=Ingester(ctx),
            forwarder=Forwarder(ctx),
            receipts=Receipts(ctx),
            webindex=WebIndexer(ctx),
            renderers=RenderWorkers(
                settings.web.render_workers, settings.web.render_timeout, settings.web.render_memory
            ),
            volume_lock=lock,
        )
        gw.ingester.workers = gw.packager
        gw.router.waiting = intake.waiting_studies  # acknowledged here, not indexed yet: not stable
        gw.scp.on_report = ctx.wakes.forwarder.set  # a PACS's commitment report came to our DICOM port
        gw.scp.on_association = auditor.association
        gw.join_cluster()
        await gw.recover()
        # after the reconciliation: a transfer it completes (a crash kept its last mail from the catalog) is audited
        await auditor.start_up(keys.book, catalog)
        return gw

    def join_cluster(self) -> None:
        """A cluster node's ties to its stages: a lapsed node's journals are replayed by our intake, the DICOM
        port closes while the catalog is unreachable, the heartbeat carries our counters, a take-over wakes the
        stage whose items it put back."""
        if not isinstance(self.claims, Cluster):
            return
        self.claims.d_root, self.claims.replay = self.storage.root, self.intake.replay
        self.claims.finish = lambda: self.reconcile_catalog(self.ctx.audit)  # a lapsed node's items
        self.claims.on_minority = self.scp.pause
        self.claims.counters = self.node_counters
        self.claims.wake = lambda kind: (self.wakes.sender if kind == SEND else self.wakes.ingest).set()

    async def recover(self) -> None:
        """Start-up: re-queue work a crash left active, finish staged sets, make the catalog agree with the disk.
        In a cluster, what is shared is recovered by whoever takes it: active items by the take-over of lapsed
        claims, staged sets and fragment groups by the node that takes the packaging and housekeeping roles."""
        if not self.claims.clustered:
            await self.recover_shared()
        fixed = await record("catalog reconciliation", self.reconcile_catalog)
        if fixed:
            log.info("catalog brought in line with the queues for %d mails", fixed)

    async def recover_shared(self) -> None:
        """Active items back to incoming; completed fragment groups and staged sets queued."""
        for name, spool in (("outbox", self.outbox), ("inbox", self.inbox)):
            for item in await asyncio.to_thread(spool.recover):
                log.warning("%s item %s was active at a crash: now %s", name, item.id, item.state)
        for item_id in await asyncio.to_thread(self.fragments.sweep, self.inbox):
            log.info("fragments completed before a crash queued as %s", item_id)
        await self.release_staged()

    async def release_staged(self) -> None:
        released = await self.packager.release_staged()
        if released:
            log.info("moved %d recorded but staged sets into the outbox", released)

    async def sweep_fragments(self) -> None:
        for item_id in await asyncio.to_thread(self.fragments.sweep, self.inbox):
            log.info("fragments completed before a crash queued as %s", item_id)

    def node_counters(self) -> dict[str, Any]:
        """What a cluster node tells the others with its heartbeat (for `status` and check_mk; no patient data)."""
        return {
            "received": self.intake.received,
            "sent_mails": self.sender.sent,
            "fetched_mails": self.fetcher.fetched,
            "ingested_mails": self.ingester.ingested,
            "quarantined_mails": self.ingester.quarantined,
            "dicom_port": self.scp.listener.listening,
            "catalog_member": self.catalog.db.member_address,
        }

    async def reconcile_catalog(self, audit: Auditor | None = None) -> int:
        """The queues are the truth for mails: record what the catalog missed (a crash between disk and catalog)."""
        return await catalog_from_queues(self.outbox, self.inbox, self.catalog, audit)

    async def reconcile_storage(self) -> dict[str, int]:
        """Compare stored files with catalog rows and report differences (runs in the background after start)."""
        self.storage_report = await storage_against_catalog(self.storage, self.catalog)
        return self.storage_report

    def wake_all(self) -> None:
        """Wake every stage (after an operator released a mail)."""
        for event in self.ctx.wakes.all():
            event.set()

    async def housekeeping(self) -> None:
        """Every 10 minutes: temp files of aborted receives, and finished queue items older than DONE_KEEP_DAYS."""
        while True:
            await asyncio.sleep(600)
            try:
                now = time.time()
                # a receive that pynetdicom aborted (e.g. the disk filled up mid-dataset) leaves its temp file
                swept = await asyncio.to_thread(self.storage.sweep_tmp, 3600, now)
                pruned = 0
                if self.claims.mine("role", "housekeeping"):  # shared queues and storage: one node at a time
                    await self.sweep_fragments()
                    for q in (self.outbox, self.inbox):
                        pruned += await asyncio.to_thread(q.prune_done, DONE_KEEP_DAYS * 86400, now)
                    pruned += await purge_accepted(
                        self.settings, self.storage, self.catalog, now, self.ctx.audit
                    )
                if swept or pruned:
                    log.info(
                        "housekeeping: %d stale temp files, %d finished queue items removed", swept, pruned
                    )
            except Exception:
                log.exception("housekeeping failed")

    async def probe_nodes(self) -> None:
        """After a node's cool-down, probe the SMTP nodes that failed last (no mail is sent): an idle node that
        came back is OK again in check_mk without waiting for traffic. Mailbox nodes are polled in turn anyway."""
        local = self.settings.mail.address.split("@", 1)[1]
        while True:
            await asyncio.sleep(max(5.0, self.settings.mail.node_cooldown / 2))
            try:
                await self.sender.smtp.probe_failing(local)
            except Exception:
                log.exception("probing mail nodes failed")

    async def publish_health(self) -> None:
        """Every 5 s: heartbeat, node health and counters to d_root/state/health.json (for check_mk)."""
        started = time.time()
        while True:
            try:
                await asyncio.to_thread(
                    monitoring.write_health,
                    self.settings,
                    {**self.status(), "heartbeat": time.time(), "started": started},
                )
            except Exception:
                log.exception("could not publish health")
            await asyncio.sleep(5)

    def mail_pools(self) -> dict[str, NodePool[Node]]:
        """Protocol → the pool of mail nodes it uses (their health: status, check_mk, /metrics)."""
        return {"smtp": self.sender.smtp.pool, self.settings.mail.protocol: self.fetcher.mailbox.pool}

    def status(self) -> dict[str, Any]:
        """Live counters (no patient data)."""
        nodes = {}
        for name, pool in self.mail_pools().items():
            nodes[name] = {
                str(n): {
                    "ok": h.successes,
                    "failed": h.failures,
                    "last_ok": h.last_ok,
                    "last_error": h.last_error,
                    "last_error_at": h.last_error_at,
                }
                for n, h in pool.health.items()
            }
        return {
            "intake": self.intake.stats(),
            "sent_mails": self.sender.sent,
            "fetched_mails": self.fetcher.fetched,
            "ingested_mails": self.ingester.ingested,
            "quarantined_mails": self.ingester.quarantined,
            "queues": {"outbox": self.outbox.counts(), "inbox": self.inbox.counts()},
            "event_loop": {
                "max_block_ms": round(self.loop_watch.max_block * 1000, 1),
                "max_block_at": self.loop_watch.max_block_at,
                "max_block_parts_ms": {
                    k: round(v * 1000, 1) for k, v in self.loop_watch.max_block_parts.items()
                },
                "blocks_over_100ms": self.loop_watch.blocks_over_100ms,
            },
            "nodes": nodes,
            "cluster": self.claims.view(),
            "stalled": self.progress.stalled(time.time(), self.settings.monitoring.stage_stall),
            "fetch_given_up": self.fetcher.failures.stuck(),
            "fetch_too_large": self.fetcher.too_large,
            "quota_drops": self.ingester.quota_drops,
            "partners": self.keys.book.expiry(),
            "fragments": [
                g.describe(self.settings.mail.reassembly_deadline, time.time())
                for g in self.fragments.groups()
            ],
        }

    @property
    def access_log(self) -> Path:
        """Where the web port logs who looked at what (`gateway.access`), for the audit trail to read."""
        return self.storage.node_state / "access"

    def _start_background(self, tg: asyncio.TaskGroup) -> None:
        """Background tasks: the audit trail's (noted events and access lines each second; the repository forwarder).
        And a cluster node's heartbeat (watched by /healthz like the stages)."""
        if isinstance(self.claims, Cluster):
            self.tasks.append(tg.create_task(self.claims.run_forever(), name="cluster"))
        if self.ctx.audit is None:
            return
        tg.create_task(self.ctx.audit.run_forever(self.access_log, self.audit_wake), name="audit-notes")
        if self.settings.audit.repository is not None:
            self.audit_forwarder = AuditForwarder(
                self.ctx.audit.trail, audit_repository(self.settings), self.settings.audit.app_name
            )
            tg.create_task(self.audit_forwarder.run_forever(self.audit_wake), name="audit")

    async def _stop_audit(self) -> None:
        """The last noted events and access lines, Application Stop, and a bounded wait for the repository."""
        if self.ctx.audit is None:
            return
        await self.ctx.audit.flush()
        await self.ctx.audit.access.round(self.access_log)
        await self.ctx.audit.application(start=False)
        self.audit_wake.set()
        if self.audit_forwarder is not None and not await self.audit_forwarder.drained(5):
            log.warning("the audit repository has not got every record yet: they go after the next start")

    async def run(self) -> None:
        """Run every stage until `stopping` is set."""
        collector = metrics.attach(self)
        role = self.claims.run_role
        try:
            async with asyncio.TaskGroup() as tg:
                # the stages that must run as long as the gateway does (watched by /healthz)
                self.tasks = [
                    tg.create_task(self.intake.index_forever(), name="index"),
                    tg.create_task(self.scp.run_forever(), name="dicom-receivers"),
                    tg.create_task(role("route", self.router.run_forever), name="route"),
                    tg.create_task(
                        role("package", self.packager.run_forever, self.release_staged), name="package"
                    ),
                    tg.create_task(self.sender.run_forever(), name="send"),
                    tg.create_task(role("fetch", self.fetcher.run_forever), name="fetch"),
                    tg.create_task(self.ingester.run_forever(), name="ingest"),
                    tg.create_task(self.housekeeping(), name="housekeeping"),
                    tg.create_task(
                        role("backup", lambda: backup.run_forever(self.settings, self.ctx.audit)),
                        name="backup",
                    ),
                    tg.create_task(self.publish_health(), name="health"),
                    tg.create_task(self.probe_nodes(), name="probe-nodes"),
                    tg.create_task(role("forward", self.forwarder.run_forever), name="forward"),
                    tg.create_task(role("receipts", self.receipts.run_forever), name="receipts"),
                    tg.create_task(role("webindex", self.webindex.run_forever), name="webindex"),
                    tg.create_task(self.loop_watch.run_forever(), name="loop-watch"),
                ]
                self._start_background(tg)
                tg.create_task(self.reconcile_storage(), name="storage-check")  # runs once
                webapp = WebApp(self) if self.settings.web.port else None
                if webapp is not None:
                    await webapp.start()
                await self.scp.wait_ready()
                self.scp.start()
                log.info(
                    "gateway %s ready: DICOM %s:%d AE %s; partners: %s",
                    self.settings.name,
                    self.settings.dicom_bind,
                    self.scp.port,
                    self.settings.ae_title,
                    ", ".join(f"{p.ae_title}→{p.name}" for p in self.settings.partners) or "none",
                )
                if self.ctx.audit is not None:
                    await self.ctx.audit.application(start=True)
                await self.stopping.wait()
                log.info("stopping: DICOM port closes, then the stages")
                await self._stop_audit()
                self.scp.stop()
                if webapp is not None:
                    await webapp.stop()
                raise _Stop
        except* _Stop:
            pass
        finally:
            metrics.detach(collector)
            self.scp.stop()
            await self.close()

    async def close(self) -> None:
        """Give back what `create` took: the worker processes, the catalog connection, GnuPG's working home, and
        last the lock on D: (another gateway may start on it now)."""
        self.packager.close()
        await self.renderers.close()
        await self.catalog.close()
        if self.keys.pgp is not None:
            self.keys.pgp.close()
        if self.volume_lock >= 0:
            os.close(self.volume_lock)
            self.volume_lock = -1


class _Stop(Exception):
    """Raised inside the TaskGroup to cancel every stage."""


def audit_repository(settings: Settings) -> Repository:
    """The Audit Record Repository's address and our TLS client context (client certificate; its CA only)."""
    a = settings.audit
    assert a.repository is not None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(a.tls_ca) if a.tls_ca else None)
    if a.client_cert and a.client_key:
        ctx.load_cert_chain(str(a.client_cert), str(a.client_key))
    return Repository(a.repository.host, a.repository.port, ctx)


def tune_malloc() -> None:
    """Give large buffers back to the system as soon as they are freed (glibc only; elsewhere nothing happens).

    The gateway handles mails of 20 MB and more, a few copies at a time, in a pool of threads. glibc's default
    raises its mmap threshold after such buffers are freed and keeps them in per-thread arenas, so the resident
    size grows towards the worst case of every thread at once. A fixed 1 MB threshold (which also ends the
    dynamic raising) and two arenas keep RSS near what is in use.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold, m_arena_max = -3, -8
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_arena_max, 2)


async def run(settings: Settings) -> None:
    """Run a gateway until SIGTERM or SIGINT."""
    tune_malloc()
    gw = await Gateway.create(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, gw.stopping.set)
    await gw.run()
