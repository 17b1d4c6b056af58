"""Stage 6, ingest: verify, decrypt and store fetched mails; quarantine what must not be ingested.

A mail is ingested only when it is encrypted to us, signed by the partner whose address sent it (its pinned
certificate from the configuration), and every part is a readable DICOM instance (`core.inbound`). Otherwise the
whole mail is held (`spool/inbox/hold/<id>/`, the reason in its meta.json) and its catalog row says why. Nothing
of a refused mail is stored.

De-duplication: a set part already ingested is recorded as a duplicate; an instance whose SOP Instance UID is
already stored with the same bytes is not stored twice; same UID with other bytes is kept aside (conflicts/).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback

from cryptography import x509

from gateway.catalog import Catalog, InstanceRecord
from gateway.config import Settings
from gateway.core.inbound import Refused, Sender, inspect_mail
from gateway.core.queue import QueueState
from gateway.core.smime import Identity
from gateway.core.states import MailState
from gateway.spool import Item, Spool
from gateway.stages import record, wait_woken
from gateway.storage import Storage, StoreOutcome

log = logging.getLogger(__name__)


class Ingester:
    """Turns inbox items into stored instances, or sets them aside with the reason."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        catalog: Catalog,
        identity: Identity,
        partner_certs: dict[str, x509.Certificate],
        wake: asyncio.Event,
        inbox: Spool,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.catalog = catalog
        self.identity = identity
        self.address_book = {
            p.address.lower(): Sender(p.name, (partner_certs[p.name],)) for p in settings.partners
        }
        self.wake = wake
        self.inbox = inbox
        self.wake_forwarder: asyncio.Event | None = None
        self.ingested = 0
        self.quarantined = 0

    async def quarantine(self, item: Item, reason: str) -> None:
        """Hold the mail with its reason (an operator may release or discard it); record it."""
        self.inbox.move(item, QueueState.HOLD, reason=reason)
        await record("quarantine", lambda: self._finish_once(item.id, MailState.QUARANTINED, error=reason))
        self.quarantined += 1
        log.warning("mail %s quarantined: %s", item.id, reason)

    async def _finish_once(self, mail_id: str, state: MailState, **kw: object) -> bool:
        """finish_in_mail unless the catalog already has the outcome (a crash after it, before the disk move)."""
        row = await self.catalog.db.fetchone("SELECT state FROM mails WHERE id = ?", (mail_id,))
        if row is None:
            await self.catalog.record_in_mail(mail_id, f"spool/inbox/{mail_id}", 0, time.time())
        elif row[0] != MailState.FETCHED.value:
            return False
        return await self.catalog.finish_in_mail(mail_id, state, time.time(), **kw)  # type: ignore[arg-type]

    async def ingest(self, item: Item) -> None:
        """Ingest or quarantine one queued mail."""
        mail_id = item.id
        row = await self.catalog.db.fetchone("SELECT state FROM mails WHERE id = ?", (mail_id,))
        if row is not None and row[0] in (MailState.INGESTED.value, MailState.DUPLICATE.value):
            # the catalog recorded the outcome before a crash; only the disk move was missing
            self.inbox.move(item, QueueState.ACTIVE)
            self.inbox.move(self.inbox.find(mail_id) or item, QueueState.DONE, drop_content=True)
            return
        # crash while active: start-up puts the mail back; storing and indexing again are idempotent
        item = self.inbox.move(item, QueueState.ACTIVE)
        raw = await asyncio.to_thread(item.content.read_bytes)
        try:
            accepted = await asyncio.to_thread(inspect_mail, raw, self.identity, self.address_book)
        except Refused as exc:
            await self.quarantine(item, exc.reason)
            return
        now = time.time()
        if await self.catalog.in_part_done(accepted.transfer_id, accepted.part):
            await self._finish_once(
                mail_id,
                MailState.DUPLICATE,
                transfer_id=accepted.transfer_id,
                part=accepted.part,
                total=accepted.total,
            )
            self.inbox.move(item, QueueState.DONE, drop_content=True, outcome="duplicate")
            log.info(
                "mail %s: set %s part %d already ingested (re-delivery)",
                mail_id,
                accepted.transfer_id,
                accepted.part,
            )
            return
        records = []
        size = 0
        for info, data in accepted.parts:
            result = await asyncio.to_thread(self.storage.store_bytes, data, info)
            if result.outcome is StoreOutcome.CONFLICT:
                log.warning(
                    "mail %s: instance %s differs from the stored one; kept aside in conflicts/",
                    mail_id,
                    info.sop_instance_uid,
                )
                continue
            size += result.size
            records.append(
                InstanceRecord(
                    info,
                    self.storage.relative(result.path),
                    result.size,
                    result.sha256,
                    "mail",
                    accepted.partner,
                    None,
                    now,
                    in_transfer=accepted.transfer_id,
                )
            )
        await self.catalog.record_instances(records)
        if self.settings.pacs:
            # before the mail counts as ingested, so a crash here re-ingests and queues them again (idempotent)
            await self.catalog.queue_forwards(
                [r.info.sop_instance_uid for r in records], [p.name for p in self.settings.pacs], time.time()
            )
            if self.wake_forwarder is not None:
                self.wake_forwarder.set()
        completed = await self._finish_once(
            mail_id,
            MailState.INGESTED,
            transfer_id=accepted.transfer_id,
            partner=accepted.partner,
            study_uid=accepted.study_uid,
            part=accepted.part,
            total=accepted.total,
            instances=len(records),
            size=size,
        )
        # crash here: the catalog says ingested, the item is still active: on restart it is recognised and finished
        self.inbox.move(item, QueueState.DONE, drop_content=True, outcome="ingested")
        self.ingested += 1
        log.info(
            "mail %s: set %s part %d/%d ingested, %d instances",
            mail_id,
            accepted.transfer_id,
            accepted.part,
            accepted.total,
            len(records),
        )
        if completed:
            log.info("transfer %s complete", accepted.transfer_id)

    async def run_once(self) -> int:
        """Ingest every due mail; return how many were handled. Disk and I/O trouble defers, a bug sets aside."""
        handled = 0
        for item in await asyncio.to_thread(self.inbox.due, time.time()):
            if not self.storage.has_room():
                log.warning("D: below its free-space reserve: ingest paused")
                break
            try:
                await self.ingest(item)
                handled += 1
            except OSError as exc:
                # disk full or an I/O error: the mail waits and is ingested again later
                log.warning("mail %s: ingest deferred: %s", item.id, exc.strerror or type(exc).__name__)
                current = self.inbox.find(item.id)
                if current is not None and current.state is QueueState.ACTIVE:
                    self.inbox.move(
                        current, QueueState.DEFERRED, next_attempt=time.time() + 30, last_error=str(exc)[:500]
                    )
                break
            except Exception as exc:
                log.exception("mail %s: unexpected error; set aside as corrupt", item.id)
                current = self.inbox.find(item.id)
                if current is not None and current.state is QueueState.ACTIVE:
                    reason = f"internal error: {type(exc).__name__}"
                    self.inbox.move(
                        current, QueueState.CORRUPT, reason=reason, traceback=traceback.format_exc()[-4000:]
                    )
                    await record(
                        "corrupt",
                        functools.partial(self._finish_once, item.id, MailState.QUARANTINED, error=reason),
                    )
        return handled

    async def run_forever(self) -> None:
        """Ingest fetched mails as they arrive; never dies."""
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("ingest loop error; retrying")
            await wait_woken(self.wake, 5)
