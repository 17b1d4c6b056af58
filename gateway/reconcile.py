"""Start-up checks that make the catalog agree with D:: the queues are the truth for mails, the files for what is
stored. Run by the gateway after a start (`Gateway.recover`, `Gateway.reconcile_storage`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gateway.catalog import Catalog
from gateway.core.queue import QueueState
from gateway.core.states import IllegalTransition, MailState
from gateway.spool import Spool
from gateway.storage import Storage

log = logging.getLogger(__name__)


async def catalog_from_queues(outbox: Spool, inbox: Spool, catalog: Catalog, audit: Any = None) -> int:
    """The queues are the truth for mails: record what the catalog missed (a crash between disk and catalog).
    With `audit` (an `Auditor`), a transfer this completes gets its event too (at a start, `Auditor.start_up`
    does that after this)."""
    fixed = 0
    now = time.time()
    for item in (
        outbox.items(QueueState.DONE) + outbox.items(QueueState.HOLD) + outbox.items(QueueState.CORRUPT)
    ):
        mid = str(item.meta.get("message_id", ""))
        if await catalog.mail_state(mid) != MailState.QUEUED.value:
            continue
        try:
            if item.state is QueueState.DONE:
                await catalog.mark_mail_sent(mid, str(item.meta.get("node", "")), now)
            else:
                await catalog.fail_mail(mid, str(item.meta.get("reason", "set aside")), now)
        except IllegalTransition as exc:
            # the catalog's transfer says otherwise (an operator, or a defect): said, never a gateway that cannot
            # start over one mail's record
            log.error("start-up check: outbound mail %s is %s in the queue, but %s", item.id, item.state, exc)
            continue
        fixed += 1
    for state in (QueueState.INCOMING, QueueState.DEFERRED, QueueState.HOLD, QueueState.CORRUPT):
        for item in inbox.items(state):
            if await catalog.record_in_mail(
                item.id, f"spool/inbox/{item.id}", int(item.meta.get("size", 0)), now
            ):
                fixed += 1
            if (
                state in (QueueState.HOLD, QueueState.CORRUPT)
                and await catalog.mail_state(item.id) == MailState.FETCHED.value
            ):
                reason = str(item.meta.get("reason", "set aside"))
                await catalog.finish_in_mail(item.id, MailState.QUARANTINED, now, error=reason)
                fixed += 1
    if fixed and audit is not None:
        await audit.catch_up(catalog)
    return fixed


async def storage_against_catalog(storage: Storage, catalog: Catalog) -> dict[str, int]:
    """Compare stored files with catalog rows and report differences (runs in the background after start)."""

    def files() -> set[str]:
        return {storage.relative(p) for p in storage.images.rglob("*.dcm")}

    # the rows first: a row's file is durable before the row is written, so a file stored while the disk is read
    # (the DICOM port is open; in a cluster, other nodes store too) is never taken for a missing one
    rows = await catalog.instance_paths(purged=False)
    purged = await catalog.instance_paths(purged=True)
    on_disk = await asyncio.to_thread(files)
    for path in on_disk & purged - rows:  # a purge interrupted between the catalog and the unlink
        (storage.root / path).unlink(missing_ok=True)
    on_disk -= purged - rows
    unindexed, missing = on_disk - rows, rows - on_disk
    for path in sorted(missing)[:50]:
        log.error("catalog row without file: %s", path)
    if unindexed:
        # a file stored but never acknowledged nor recorded (a crash in between); a resend indexes it
        log.warning(
            "%d stored files have no catalog row (never acknowledged); first: %s",
            len(unindexed),
            min(unindexed),
        )
    if missing:
        log.error("%d catalog rows have no file on D:", len(missing))
    report = {
        "files": len(on_disk),
        "rows": len(rows),
        "unindexed": len(unindexed),
        "missing": len(missing),
    }
    log.info(
        "storage check: %d files, %d rows, %d unindexed, %d missing",
        len(on_disk),
        len(rows),
        len(unindexed),
        len(missing),
    )
    return report
