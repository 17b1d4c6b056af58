"""Stage 8, receipts: the MDNs we owe our partners, and the ones we wait for.

Owed (inbound): ingest records one per mail that asked for it (`Disposition-Notification-To`) and whose sender is
a partner configured with `receipts = true`: OK once stored, or once every configured PACS has a final answer for
its instances (all accepted → `displayed`; some refused → `displayed/warning` with the count); `deleted/error`
with the reason for a quarantined mail; `deleted` when an operator discards a held mail. The MDN is signed (S/MIME
partners) or signed and encrypted (PGP/MIME partners, as @GIT does) and goes through the outbox like any mail.

Awaited (outbound): `ingest` matches partners' MDNs to our mails; here, sent transfers still without their receipt
after `mail.receipt_deadline` are flagged `overdue`. Partners configured without receipts are never awaited.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from gateway import formats
from gateway.config import Partner
from gateway.core import mdn, mime, proof
from gateway.stages import RECEIPT, TRANSIENT_ERRORS, wait_woken
from gateway.stages.context import Stage, StageContext
from gateway.storage import sha256_file

log = logging.getLogger(__name__)

MAX_TRIES = 3


def receipt_item_id(receipt_id: str) -> str:
    """The outbox item of the receipt for one inbound mail."""
    return "mdn-" + hashlib.sha256(receipt_id.encode()).hexdigest()[:32]


def pacs_state(forwards: list[tuple[str, str, str | None, str | None]], configured: int) -> tuple[str, str]:
    """The worst of what the PACS did with one instance (`mdn.PACS_STATES`), and its reason: committed (storage
    commitment), stored (C-STORE success from a PACS without commitment), pending, not-committed, refused."""
    if not configured:
        return "none", ""
    states = []
    for _, state, commitment, error in forwards:
        if state == "accepted":
            states.append(("committed" if commitment == "committed" else "stored", ""))
        elif state == "rejected":
            states.append(("not-committed" if commitment == "failed" else "refused", error or ""))
        else:
            states.append(("pending", error or "no final answer yet"))
    if len(forwards) < configured:
        states.append(("pending", "not yet sent to every PACS"))
    worst = proof.worst(s for s, _ in states)
    return worst, next(r for s, r in states if s == worst)


class Receipts(Stage):
    """Settles, builds and queues owed receipts; flags overdue awaited ones."""

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self._failures: dict[str, int] = {}  # receipt id → failed builds in a row

    def build(
        self,
        partner: Partner,
        to: str,
        original_message_id: str,
        outcome: str,
        detail: str,
        mic: str | None = None,
        stored: list[mdn.Stored] | None = None,
    ) -> bytes:
        """The MDN mail for one inbound mail, sealed as the partner's format seals receipts (S/MIME: signed;
        PGP/MIME: signed and encrypted); with the proof of content where the mail was stored."""
        me = self.settings.mail.address
        report = mdn.build_report(
            sender=me,
            original_message_id=original_message_id,
            outcome=outcome,
            detail=detail,
            mic=mic,
            stored=stored,
        )
        now = time.time()
        mid = f"<mdn.{hashlib.sha256(original_message_id.encode()).hexdigest()[:24]}@{me.split('@', 1)[1]}>"
        subject = f"Disposition notification ({outcome})"
        head = mime.header_lines(mdn.outer_headers(me, to, subject, mid, now))
        keys = formats.SealKeys(
            identity=self.keys.identity,
            pgp=self.keys.pgp,
            fingerprint=self.keys.book[partner.name].pgp_fingerprint,
        )
        return head + formats.get(partner.format).seal_receipt(report, keys)

    async def stored(self, sops: list[str]) -> list[mdn.Stored]:
        """What we hold of each instance a mail carried, as the receipt reports it: the SHA-256 of the file on D:
        read now (not the digest recorded when it was stored: the receipt proves what is there), and the worst
        of what the PACS did with it (`pacs_state`)."""
        facts = await self.catalog.receipt_facts(sops)
        root = self.storage.root

        def digest(path: str | None) -> str | None:
            if path is None:
                return None
            try:
                return sha256_file(root / path)
            except FileNotFoundError:
                return None

        digests = await asyncio.to_thread(lambda: {sop: digest(facts[sop][0]) for sop in sops})
        out = []
        for sop in sops:
            state, reason = pacs_state(facts[sop][1], len(self.settings.pacs))
            out.append(mdn.Stored(sop, digests[sop], state, reason))
        return out

    async def settle_waiting(self) -> int:
        """Receipts waiting for the PACS: decide them once every forward has a final answer."""
        settled = 0
        for r in await self.catalog.receipts_out(("waiting",)):
            sops = str(r["sop_uids"] or "").split()
            facts = await self.catalog.receipt_facts(sops)
            final = ("accepted", "rejected")
            rejected = [sop for sop in sops if any(f[1] == "rejected" for f in facts[sop][1])]
            uncommitted = [sop for sop in rejected if any(f[2] == "failed" for f in facts[sop][1])]
            waiting = [
                sop
                for sop in sops
                if sop not in rejected
                and facts[sop][1]  # none at all: not stored from this mail (a conflict kept aside)
                and (
                    len(facts[sop][1]) < len(self.settings.pacs)
                    or any(f[1] not in final for f in facts[sop][1])
                )
            ]
            overdue = time.time() - float(str(r["created_at"])) >= self.settings.mail.receipt_pacs_deadline
            if waiting and not overdue:
                continue
            if rejected or waiting:
                # a PACS that refused, or one that has not answered within the deadline: the partner learns it now
                # rather than never; the instances are stored here either way
                said = []
                if len(rejected) > len(uncommitted):
                    said.append(
                        f"the PACS refused {len(rejected) - len(uncommitted)} of {len(sops)} instances"
                    )
                if uncommitted:
                    said.append(f"the PACS did not commit {len(uncommitted)} of {len(sops)} instances")
                if waiting:
                    said.append(f"the PACS has not yet answered for {len(waiting)} of {len(sops)} instances")
                outcome, detail = mdn.WARNING, "stored; " + "; ".join(said)
            else:
                committing = any(p.storage_commitment for p in self.settings.pacs)
                outcome, detail = (
                    mdn.OK,
                    f"stored and {'committed' if committing else 'accepted'} by the PACS",
                )
            await self.catalog.set_receipt_out(str(r["id"]), "due", time.time(), outcome, detail)
            settled += 1
        return settled

    async def queue_due(self) -> int:
        """Build and queue every due receipt. One that cannot be built is tried again at the next turns and, after
        `MAX_TRIES`, set aside as `failed` with the error logged: it never holds up the receipts behind it."""
        queued = 0
        due = await self.catalog.receipts_out(("due",))
        self.progress.receipts.beat(bool(due))
        for r in due:
            self.progress.receipts.done()
            try:
                queued += await self._queue_one(r)
            except TRANSIENT_ERRORS:
                raise  # the catalog or D: is away: the whole turn is tried again
            except Exception as exc:
                rid = str(r["id"])
                tries = self._failures[rid] = self._failures.get(rid, 0) + 1
                log.exception("receipt %s could not be built (try %d of %d)", rid, tries, MAX_TRIES)
                if tries >= MAX_TRIES:
                    await self.catalog.set_receipt_out(
                        rid,
                        "failed",
                        time.time(),
                        str(r["outcome"]),
                        f"could not be built: {type(exc).__name__}",
                    )
                    self._failures.pop(rid, None)
        self.progress.receipts.idle()
        if queued:
            self.wakes.sender.set()
        return queued

    async def _queue_one(self, r: dict[str, object]) -> int:
        partner = self.settings.partner_by_name(str(r["partner"]))
        if partner is None:
            await self.catalog.set_receipt_out(str(r["id"]), "dropped", time.time())
            return 0
        outcome = str(r["outcome"])
        sops = str(r["sop_uids"] or "").split()
        stored = await self.stored(sops) if sops and outcome in (mdn.OK, mdn.WARNING) else None
        data = await asyncio.to_thread(
            self.build,
            partner,
            str(r["to_addr"]),
            str(r["original_message_id"]),
            outcome,
            str(r["detail"] or ""),
            str(r["content_mic"] or "") or None,
            stored,
        )
        meta = {
            "kind": RECEIPT,
            "partner": partner.name,
            "to": str(r["to_addr"]),
            "receipt": str(r["id"]),
            "message_id": receipt_item_id(str(r["id"])),
            "attempts": 0,
        }
        await asyncio.to_thread(self.outbox.put, receipt_item_id(str(r["id"])), data, meta)
        # crash here: the item is queued; put() is idempotent, so building it again changes nothing
        await self.catalog.set_receipt_out(str(r["id"]), "queued", time.time())
        return 1

    async def run_forever(self) -> None:
        """Settle, queue, flag; never dies."""
        while True:
            try:
                await self.settle_waiting()
                await self.queue_due()
                flagged = await self.catalog.flag_overdue_receipts(
                    self.settings.mail.receipt_deadline, time.time()
                )
                if flagged:
                    log.warning("%d sent transfers have no receipt from their partner yet (overdue)", flagged)
                self.guard.ok()
            except Exception as exc:
                if not await self.guard.pause(exc):
                    return
            await wait_woken(self.wakes.receipts, 5)
