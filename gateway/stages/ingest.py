"""Stage 6, ingest: verify, decrypt and store fetched mails; quarantine what must not be ingested.

A mail is ingested only when it is encrypted to us, signed by the partner whose address sent it (its pinned
certificate from the configuration), and every part is a readable DICOM instance (`core.inbound`). Otherwise the
whole mail is held (`spool/inbox/hold/<id>/`, the reason in its meta.json) and its catalog row says why. Nothing
of a refused mail is stored.

De-duplication: a set part already ingested is recorded as a duplicate; an instance whose SOP Instance UID is
already stored with the same bytes is not stored twice; same UID with other bytes is kept aside (conflicts/).

Size: one stage whose every path (stored, duplicate, fragment, receipt, quarantined, deferred) ends in a queue
move with its crash point beside it; split, the crash story would be spread over modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Protocol

from gateway import untrusted
from gateway.catalog import InstanceRecord
from gateway.cluster import GROUP, INGEST
from gateway.core import inbound, mailformat, mdn, partial
from gateway.core.queue import QueueState
from gateway.core.states import MailState
from gateway.fragments import GroupDropped
from gateway.spool import Item, read_head
from gateway.stages import TRANSIENT_ERRORS, record, wait_woken
from gateway.stages.context import Stage, StageContext
from gateway.stages.workers import (
    WORKERS,
    Unpacked,
    opens_in_worker,
    remove_files,
    unpack_in_worker,
    unpack_parts,
)
from gateway.storage import StoreOutcome

log = logging.getLogger(__name__)

_FINISHED = tuple(
    s.value for s in (MailState.INGESTED, MailState.DUPLICATE, MailState.FRAGMENT, MailState.RECEIPT)
)


class Workers(Protocol):
    """The gateway's worker processes (the packager owns them): `pool()`, and `close()` after one broke."""

    def pool(self) -> ProcessPoolExecutor: ...

    def close(self) -> None: ...


class Ingester(Stage):
    """Turns inbox items into stored instances, or sets them aside with the reason."""

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.address_book = ctx.keys.book.senders()
        self.workers: Workers | None = None  # S/MIME mails are opened there (both cores), when set
        self._serial = asyncio.Lock()  # all but the opening of a mail: one mail at a time
        self.ingested = 0
        self.quarantined = 0
        self.quota_drops = 0  # unauthenticated held mails and fragment groups whose bytes the quota dropped

    async def quarantine(
        self,
        item: Item,
        reason: str,
        raw: bytes | None = None,
        *,
        public: str = inbound.MALFORMED,
        authenticated: bool = False,
        tell_sender: bool = True,
    ) -> None:
        """Hold the mail with its reason (an operator may release or discard it); record it; tell the sender
        (`raw` given: with `public`, a phrase of the fixed vocabulary, never the reason itself).

        An unauthenticated mail (refused before a partner's signature was verified) counts against the quota for
        unauthenticated content, which may drop the oldest such bytes; an authenticated one is kept as it is."""
        sender = ""
        if raw is not None:
            with contextlib.suppress(mailformat.MailFormatError):
                sender = mailformat.read_outer(raw).sender
        await asyncio.to_thread(
            self.inbox.move,
            item,
            QueueState.HOLD,
            reason=reason,
            public_reason=public,
            authenticated=authenticated,
            sender=sender or str(item.meta.get("sender", "")),
        )
        if self.ctx.audit is not None:
            await self.ctx.audit.quarantined(item.id, sender, authenticated, reason)
        await record("quarantine", lambda: self._finish_once(item.id, MailState.QUARANTINED, error=reason))
        self.quarantined += 1
        log.warning(
            "mail %s quarantined%s: %s", item.id, "" if authenticated else " (unauthenticated)", reason
        )
        if raw is not None and tell_sender:
            await self._owe_receipt(item.id, raw, mdn.ERROR, f"not processed: {public}")
        if not authenticated:
            await self.enforce_quota()

    async def enforce_quota(self) -> None:
        """Keep unauthenticated content within its quotas (`gateway.untrusted`)."""
        mail = self.settings.mail
        dropped = await asyncio.to_thread(
            untrusted.enforce,
            self.inbox,
            self.fragments,
            self.storage.state,
            mail.untrusted_quota,
            mail.untrusted_quota_per_sender,
        )
        self.quota_drops += len(dropped)

    async def _owe_receipt(
        self,
        mail_id: str,
        raw: bytes,
        outcome: str,
        detail: str,
        sop_uids: list[str] | None = None,
        mic: str = "",
    ) -> None:
        """Remember the receipt this mail asked for (only to a partner's own address, never to strangers).
        Refusals to one partner beyond `mail.negative_receipts_per_hour` are recorded as suppressed, not sent."""
        try:
            outer = mailformat.read_outer(raw)
        except mailformat.MailFormatError:
            return
        partner = self.settings.partner_by_address(outer.sender)
        if partner is None or not partner.receipts or not outer.notify or not outer.message_id:
            return
        to = outer.notify if self.settings.partner_by_address(outer.notify) is partner else partner.address
        wait = bool(self.settings.pacs) and bool(sop_uids) and outcome == mdn.OK
        now = time.time()
        suppress = False
        if outcome in (mdn.ERROR, mdn.FAILED):
            recent = await record(
                "receipt", lambda: self.catalog.negative_receipts_since(partner.name, now - 3600)
            )
            suppress = recent >= self.settings.mail.negative_receipts_per_hour
        await record(
            "receipt",
            lambda: self.catalog.queue_receipt_out(
                # one receipt per mail and outcome: a refused mail released by the operator and then stored
                # gets its positive receipt too; the same outcome twice (a crash, a re-check) is one receipt
                mail_id if outcome == mdn.OK else f"{mail_id}:{outcome}",
                partner.name,
                to,
                outer.message_id,
                outcome,
                detail,
                now,
                sop_uids=sop_uids,
                wait_for_pacs=wait,
                suppressed=suppress,
                content_mic=mic,
            ),
        )
        if suppress:
            log.warning("mail %s: refusal receipt to %s suppressed (rate limit)", mail_id, partner.name)
        self.wakes.receipts.set()

    async def _fragment(self, item: Item, raw: bytes) -> None:
        """A message/partial fragment: keep it durably (it counts as unauthenticated content until its message
        is whole and verified); when its message is complete, queue the whole mail."""
        try:
            outer = mailformat.read_outer(raw)
            if self.settings.partner_by_address(outer.sender) is None:
                raise inbound.Refused(
                    "fragment from a sender not in the address book", inbound.SENDER_UNKNOWN
                )
            key = await asyncio.to_thread(self.fragments.add, outer.sender, raw, time.time())
        except mailformat.MailFormatError as exc:
            await self.quarantine(item, f"bad message/partial fragment: {exc}", raw, tell_sender=False)
            return
        except inbound.Refused as exc:
            await self.quarantine(item, exc.reason, raw, public=exc.public, tell_sender=False)
            return
        except GroupDropped as dropped:
            # its group's fragments were dropped: this one is not kept either; the group stays listed with why
            why = dropped.reason
            await record("fragment", lambda: self._finish_once(item.id, MailState.FRAGMENT, error=why))
            await asyncio.to_thread(
                self.inbox.move,
                item,
                QueueState.DONE,
                drop_content=True,
                outcome="fragment of a dropped group",
            )
            return
        await record("fragment", lambda: self._finish_once(item.id, MailState.FRAGMENT))
        await asyncio.to_thread(self.inbox.move, item, QueueState.DONE, drop_content=True, outcome="fragment")
        await self.enforce_quota()
        whole = await self._complete(key)
        if whole is not None:
            log.info("mail %s: last fragment; message reassembled as %s", item.id, whole)
            self.wakes.ingest.set()

    async def _complete(self, key: str) -> str | None:
        """Queue a fragment group's whole message if every fragment is here. In a cluster, one node at a time
        looks (a claim on the group); another node's look takes milliseconds, so a few tries suffice, and the
        housekeeping's sweep completes any group that was missed."""
        for attempt in range(20):
            if await self.claims.take(GROUP, key) is not None:
                try:
                    return await asyncio.to_thread(self.fragments.complete, key, self.inbox)
                finally:
                    await self.claims.release(GROUP, key)
            await asyncio.sleep(0.05 * (attempt + 1))
        log.warning("fragment group: another node kept it busy; the housekeeping's sweep completes it")
        return None

    async def _receipt(self, item: Item, got: inbound.ReceiptIn, raw: bytes) -> None:
        """A partner's MDN for one of our mails: evidence only when signed by the partner the transfer went to
        and naming a mail we sent to that partner; anything else is set aside with the reason (never answered)."""
        r = got.receipt
        if not got.signed:
            # never answered (a receipt is not answered), but counted against its claimed sender's quota
            await self.quarantine(
                item, f"receipt claiming to be from {got.partner} is not signed", raw, tell_sender=False
            )
            return
        match = await record(
            "receipt",
            lambda: self.catalog.record_receipt(got.partner, r, time.time()),
        )
        if match.transfer_id is None:
            await self.quarantine(
                item,
                f"signed receipt from {got.partner} names no mail we sent to {got.partner}",
                authenticated=True,
            )
            return
        # a replay too: a crash may have come before its event (the key keeps it once)
        if self.ctx.audit is not None:
            rows = await self.catalog.transfer_audit_rows(match.transfer_id)
            await self.ctx.audit.receipt(False, got.partner, r.original_message_id, r.outcome, rows)
        await record(
            "receipt", lambda: self._finish_once(item.id, MailState.RECEIPT, transfer_id=match.transfer_id)
        )
        await asyncio.to_thread(self.inbox.move, item, QueueState.DONE, drop_content=True, outcome="receipt")
        if match.contradiction:
            log.warning(
                "receipt from %s for transfer %s contradicts its earlier one (kept beside it): %s",
                got.partner,
                match.transfer_id,
                match.contradiction,
            )
        else:
            log.info(
                "receipt from %s for transfer %s: %s%s",
                got.partner,
                match.transfer_id,
                r.outcome,
                " (repeated)" if match.replay else "",
            )

    async def _finish_once(self, mail_id: str, state: MailState, **kw: object) -> bool:
        """finish_in_mail unless the catalog already has the outcome (a crash after it, before the disk move)."""
        known = await self.catalog.mail_state(mail_id)
        if known is None:
            await self.catalog.record_in_mail(mail_id, f"spool/inbox/{mail_id}", 0, time.time())
        elif known != MailState.FETCHED.value:
            return False
        return await self.catalog.finish_in_mail(mail_id, state, time.time(), **kw)  # type: ignore[arg-type]

    async def unpack(self, head: bytes, path: Path) -> Unpacked | inbound.ReceiptIn:
        """Open one queued mail (raises `inbound.Refused`) with its instances written to temp files on D:. S/MIME
        is opened and written in a worker process, which reads the mail from `path` itself: the mail's and its
        instances' bytes never enter the gateway's process. OpenPGP (GnuPG is a process anyway) and anything
        unrecognised are opened here, in a thread. `head` is the mail's beginning (its headers)."""
        if self.workers is not None and opens_in_worker(head):
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self.workers.pool(), unpack_in_worker, path, self.settings, self.storage.tmp
                )
            except BrokenProcessPool:
                log.warning("worker processes failed; this mail is opened in the gateway process")
                self.workers.close()
        raw = await asyncio.to_thread(path.read_bytes)
        got = await asyncio.to_thread(
            inbound.inspect_mail,
            raw,
            self.keys.identity,
            self.address_book,
            self.keys.pgp,
            self.settings.mail.max_unpacked_size,
        )
        if isinstance(got, inbound.ReceiptIn):
            return got
        return await asyncio.to_thread(unpack_parts, got, self.storage.tmp)

    async def ingest(self, item: Item) -> None:
        """Ingest or quarantine one queued mail (the crash points of storing it: `_store`). Several mails may be
        opened at once (one per worker); everything else of a mail happens one mail at a time (`_serial`)."""
        mail_id = item.id
        async with self._serial:
            if await self.catalog.mail_state(mail_id) in _FINISHED:
                # the catalog recorded the outcome before a crash; only the disk move was missing
                await asyncio.to_thread(self.inbox.move, item, QueueState.ACTIVE)
                self.inbox.move(self.inbox.find(mail_id) or item, QueueState.DONE, drop_content=True)
                return
            # crash while active: start-up puts the mail back; storing and indexing again are idempotent
            item = await asyncio.to_thread(self.inbox.move, item, QueueState.ACTIVE)
            # the headers are all this process reads of a mail (who sent it, what it answers, whether it is a part)
            raw = await asyncio.to_thread(read_head, item.content)
            if partial.is_partial(raw):
                await self._fragment(item, await asyncio.to_thread(item.content.read_bytes))
                return
        try:
            got = await self.unpack(raw, item.content)
        except inbound.Refused as exc:
            async with self._serial:
                await self.quarantine(
                    item, exc.reason, raw, public=exc.public, authenticated=exc.authenticated
                )
            return
        async with self._serial:
            if isinstance(got, inbound.ReceiptIn):
                await self._receipt(item, got, raw)
                return
            try:
                await self._store(item, raw, got)
            finally:  # placed files are gone from tmp/ already; the rest (a duplicate part, an error) goes now
                await asyncio.to_thread(remove_files, [tmp for _, tmp, _, _ in got.files])

    async def _store(self, item: Item, raw: bytes, unpacked: Unpacked) -> None:
        """Store, index and finish an opened mail (its instances in temp files), or record it as a duplicate.

        Size: one mail's path from opened to finished with its crash points in order; split, the order would no longer be visible.
        """
        mail_id = item.id
        accepted = unpacked.accepted
        carried = [info.sop_instance_uid for info, _, _, _ in unpacked.files]
        now = time.time()
        if await self.catalog.in_part_done(accepted.transfer_id, accepted.part):
            await self._finish_once(
                mail_id,
                MailState.DUPLICATE,
                transfer_id=accepted.transfer_id,
                part=accepted.part,
                total=accepted.total,
            )
            await asyncio.to_thread(
                self.inbox.move, item, QueueState.DONE, drop_content=True, outcome="duplicate"
            )
            await self._owe_receipt(mail_id, raw, mdn.OK, "already received", carried, accepted.mic)
            log.info(
                "mail %s: set %s part %d already ingested (re-delivery)",
                mail_id,
                accepted.transfer_id,
                accepted.part,
            )
            return
        records = []
        size = 0
        # stored byte for byte as the mail carried it: the catalog's transfer syntax is the file's, and forwarding
        # converts for a PACS that does not take it. The files were fsynced where the mail was opened; their names
        # are flushed together here, before the catalog knows them.
        results = await asyncio.to_thread(
            self.storage.place_synced, [(tmp, info, sha, length) for info, tmp, sha, length in unpacked.files]
        )
        for (info, _, _, _), result in zip(unpacked.files, results, strict=True):
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
        self.wakes.webindex.set()
        if self.settings.pacs:
            # before the mail counts as ingested, so a crash here re-ingests and queues them again (idempotent)
            await self.catalog.queue_forwards(
                [r.info.sop_instance_uid for r in records], [p.name for p in self.settings.pacs], time.time()
            )
            self.wakes.forwarder.set()
        if self.ctx.audit is not None:  # before the mail counts as ingested: a crash here ingests it again
            await self.ctx.audit.received_from_partner(
                mail_id, accepted.partner, [(r.info.study_uid, r.info.sop_class_uid, r.path) for r in records]
            )
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
        await asyncio.to_thread(self.inbox.move, item, QueueState.DONE, drop_content=True, outcome="ingested")
        await self._owe_receipt(mail_id, raw, mdn.OK, "", carried, accepted.mic)
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
        """Ingest every due mail, as many opened at once as there are workers; return how many were handled.
        Disk and I/O trouble defers (and starts no further mail), a bug sets aside."""
        handled = 0
        due = await asyncio.to_thread(self.inbox.due, time.time())
        self.progress.ingest.beat(bool(due))
        in_flight: set[asyncio.Task[bool]] = set()
        stopped = False
        try:
            for item in due:
                while len(in_flight) >= (WORKERS if self.workers is not None else 1):
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    stopped |= not all(t.result() for t in done)
                if stopped:
                    break
                self.progress.ingest.done()
                if not self.storage.has_room():
                    log.warning("D: below its free-space reserve: ingest paused")
                    stopped = True
                    break
                claimed = await self.claims.take_item(self.inbox, INGEST, item)
                if claimed is None:
                    continue  # another cluster node ingests it
                in_flight.add(asyncio.create_task(self._ingest_claimed(claimed)))
                handled += 1
            if in_flight:
                await asyncio.wait(in_flight)
        finally:
            for task in in_flight:
                task.cancel()
        if not stopped:
            self.progress.ingest.idle()
        return handled

    async def _ingest_claimed(self, item: Item) -> bool:
        try:
            return await self._ingest_guarded(item)
        finally:
            await self.claims.release(INGEST, item.id)

    async def _ingest_guarded(self, item: Item) -> bool:
        """`ingest`, with what goes wrong recorded on the mail; False when no further mail should start now. A
        cluster node whose claim on the mail lapsed meanwhile leaves it alone: it belongs to another node now."""
        try:
            await self.ingest(item)
            return True
        except Exception as exc:
            if not self.claims.mine(INGEST, item.id):
                log.warning(
                    "mail %s: this node's claim lapsed while ingesting it; left to the node that took it",
                    item.id,
                )
                return False
            return await self._ingest_failed(item, exc)

    async def _ingest_failed(self, item: Item, exc: Exception) -> bool:
        """What went wrong with a mail: deferred, or set aside (a bug, with its traceback)."""
        if isinstance(exc, TRANSIENT_ERRORS):
            # disk full, an I/O error, the catalog away for a moment: the mail waits and is ingested again later
            why = exc.strerror if isinstance(exc, OSError) else None
            log.warning("mail %s: ingest deferred: %s", item.id, why or type(exc).__name__)
            current = self.inbox.find(item.id)
            if current is not None and current.state is QueueState.ACTIVE:
                self.inbox.move(
                    current, QueueState.DEFERRED, next_attempt=time.time() + 30, last_error=str(exc)[:500]
                )
            return False
        log.error("mail %s: unexpected error; set aside as corrupt", item.id, exc_info=exc)
        current = self.inbox.find(item.id)
        if current is not None and current.state is QueueState.ACTIVE:
            reason = f"internal error: {type(exc).__name__}"
            trace = "".join(traceback.format_exception(exc))[-4000:]
            self.inbox.move(current, QueueState.CORRUPT, reason=reason, traceback=trace)
            await record(
                "corrupt", functools.partial(self._finish_once, item.id, MailState.QUARANTINED, error=reason)
            )
        return True

    async def run_forever(self) -> None:
        """Ingest fetched mails as they arrive; never dies."""
        while True:
            try:
                await self.run_once()
                self.guard.ok()
            except Exception as exc:
                if not await self.guard.pause(exc):
                    return
            await wait_woken(self.wakes.ingest, 5)
