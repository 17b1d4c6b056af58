"""Receipts both ways: what partners' receipts said about our mails, and the receipts we owe them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.catalog.base import CatalogBase
from gateway.core.mdn import Receipt
from gateway.core.proof import DIFFERS, NOT_VERIFIED, VERIFIED, judge
from gateway.core.states import TransferState, settle_receipt


@dataclass(frozen=True)
class ReceiptMatch:
    """What a partner's receipt did: the transfer it answers (None: no mail we sent to that partner), whether
    it only repeated what the partner said before, or the contradiction it was recorded as."""

    transfer_id: str | None
    replay: bool = False
    contradiction: str | None = None


class ReceiptsRoom(CatalogBase):
    async def record_receipt(self, partner: str, receipt: Receipt, now: float) -> ReceiptMatch:
        """A partner's verified MDN for one of our mails.

        It counts only for a mail we sent to that same partner (`transfer_id` None otherwise: the caller sets it
        aside). A mail's final receipt stands (`core.states.settle_receipt`): a replay changes nothing, a
        different later answer is recorded as a contradiction beside the first and never replaces it. The
        transfer's receipt becomes `failed` as soon as one mail failed at the partner, `confirmed` (or
        `warning`) when every mail of it has a positive receipt. What the receipt proves about the mail's
        content (`core.proof.judge`) is recorded with it, per mail and per instance.


        Size: one transaction holds every case of the receipt table (new, replayed, contradicting), in the order `core.states.settle_receipt` decides them.
        """
        original_message_id, outcome, detail = receipt.original_message_id, receipt.outcome, receipt.detail
        async with self.db.transaction() as tx:
            rows = await tx.fetchall(
                """SELECT m.transfer_id, m.receipt, m.part, m.content_mic FROM mails m
                   JOIN transfers t ON t.id = m.transfer_id
                   WHERE m.direction = 'out' AND m.mdn_id = ? AND t.partner = ?""",
                (original_message_id, partner),
            )
            if not rows or rows[0][0] is None:
                return ReceiptMatch(None)
            transfer_id = str(rows[0][0])
            kept, contradicts = settle_receipt(rows[0][1], outcome)
            if contradicts:
                note = (
                    f"mail {rows[0][2]}: the partner said {kept}, a later receipt says {outcome}"
                    f"{': ' + detail if detail else ''}"
                )[:1000]
                await tx.execute(
                    "UPDATE transfers SET receipt_conflict = ?, receipt_at = ? WHERE id = ?",
                    (note, now, transfer_id),
                )
                return ReceiptMatch(transfer_id, contradiction=note)
            if kept == rows[0][1]:
                return ReceiptMatch(transfer_id, replay=True)
            await self._record_proof(tx, transfer_id, rows[0][3], receipt)
            await tx.execute(
                "UPDATE mails SET receipt = ?, receipt_detail = ? WHERE direction = 'out' AND mdn_id = ?",
                (outcome, detail[:1000] or None, original_message_id),
            )
            marks = await tx.fetchall(
                "SELECT mdn_id, receipt, receipt_detail, part FROM mails WHERE direction = 'out' AND transfer_id = ?",
                (transfer_id,),
            )
            by_id: dict[str, tuple[str | None, str | None, int]] = {}
            for mdn_id, said, receipt_detail, part in marks:
                by_id[str(mdn_id)] = (said, receipt_detail, int(part or 0))
            failed = [(p, d) for r, d, p in by_id.values() if r in ("deleted", "deleted/error")]
            warned = [(p, d) for r, d, p in by_id.values() if r == "displayed/warning"]
            if failed:
                part, why = min(failed)
                state, text = "failed", f"mail {part} failed at partner: {why or 'no reason given'}"
            elif all(r is not None for r, _, _ in by_id.values()):
                state, text = (
                    ("warning", "; ".join(sorted({d or "" for _, d in warned})))
                    if warned
                    else ("confirmed", "")
                )
            else:
                state, text = "awaited", ""
            await tx.execute(
                "UPDATE transfers SET receipt = ?, receipt_detail = ?, receipt_at = ? WHERE id = ?",
                (state, text[:1000] or None, now, transfer_id),
            )
            return ReceiptMatch(transfer_id)

    async def _record_proof(self, tx: Any, transfer_id: str, sent_mic: str | None, receipt: Receipt) -> None:
        """What the receipt proves about its mail (per instance and for the mail), and the transfer's proof so
        far: `differs` as soon as one mail differs, else `not-verified` as soon as one is, else `verified`."""
        mdn_id = receipt.original_message_id
        sent = {
            str(sop): str(sha)
            for sop, sha in await tx.fetchall(
                "SELECT sop_uid, sha256 FROM out_items WHERE transfer_id = ? AND mdn_id = ?",
                (transfer_id, mdn_id),
            )
        }
        verdict = judge(sent_mic, sent, receipt)
        for sop, (sha, pacs, reason) in verdict.instances.items():
            await tx.execute(
                """UPDATE out_items SET partner_sha256 = ?, partner_pacs = ?, partner_reason = ?
                   WHERE transfer_id = ? AND sop_uid = ?""",
                (sha, pacs, reason[:1000] or None, transfer_id, sop),
            )
        await tx.execute(
            "UPDATE mails SET proof = ?, proof_detail = ? WHERE direction = 'out' AND mdn_id = ?",
            (verdict.proof, verdict.detail[:1000] or None, mdn_id),
        )
        proofs = {
            str(p)
            for (p,) in await tx.fetchall(
                "SELECT proof FROM mails WHERE direction = 'out' AND transfer_id = ? AND proof IS NOT NULL",
                (transfer_id,),
            )
        }
        overall = next(p for p in (DIFFERS, NOT_VERIFIED, VERIFIED) if p in proofs)
        differing = await tx.fetchall(
            """SELECT sop_uid FROM out_items WHERE transfer_id = ? AND partner_pacs IS NOT NULL
               AND (partner_sha256 IS NULL OR partner_sha256 <> sha256) ORDER BY sop_uid""",
            (transfer_id,),
        )
        text = ""
        if overall == DIFFERS:
            uids = [str(r[0]) for r in differing]
            text = f"contents differ: {len(uids)} instances" + (f": {' '.join(uids[:20])}" if uids else "")
            if len(uids) > 20:
                text += " …"
            if not uids:
                text = "contents differ: the mail's digest differs"
        elif overall == NOT_VERIFIED:
            text = verdict.detail if verdict.proof == NOT_VERIFIED else "a receipt without digests"
        await tx.execute(
            "UPDATE transfers SET proof = ?, proof_detail = ? WHERE id = ?",
            (overall, text[:1000] or None, transfer_id),
        )

    async def flag_overdue_receipts(self, deadline: float, now: float) -> int:
        """Sent transfers still without their receipts after `deadline` seconds become `overdue`."""
        return await self.db.execute(
            """UPDATE transfers SET receipt = 'overdue', receipt_detail = ? WHERE direction = 'out'
               AND state = ? AND receipt = 'awaited' AND updated_at < ?""",
            (
                f"no receipt from the partner within {deadline / 3600:g} h",
                TransferState.SENT.value,
                now - deadline,
            ),
        )

    async def queue_receipt_out(
        self,
        receipt_id: str,
        partner: str,
        to_addr: str,
        original_message_id: str,
        outcome: str,
        detail: str,
        now: float,
        *,
        sop_uids: list[str] | None = None,
        wait_for_pacs: bool = False,
        suppressed: bool = False,
        content_mic: str = "",
    ) -> None:
        """Remember a receipt we owe (idempotent: the first outcome of a mail stands). A `suppressed` one (the
        rate limit of refusals) is recorded and never sent. `sop_uids` are the instances the mail carried and
        `content_mic` the digest of its signed content: the receipt proves both."""
        await self.db.execute(
            f"""{self.db.dialect.insert_ignore} INTO receipts_out (id, partner, to_addr, original_message_id,
                sop_uids, outcome, detail, state, created_at, updated_at, content_mic)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                receipt_id,
                partner,
                to_addr,
                original_message_id,
                " ".join(sop_uids or []),
                outcome,
                detail[:1000],
                "suppressed" if suppressed else "waiting" if wait_for_pacs else "due",
                now,
                now,
                content_mic or None,
            ),
        )

    async def negative_receipts_since(self, partner: str, since: float) -> int:
        """How many refusal receipts (deleted, deleted/error) to this partner were queued since then."""
        row = await self.db.fetchone(
            """SELECT COUNT(*) FROM receipts_out WHERE partner = ? AND outcome IN ('deleted', 'deleted/error')
               AND state <> 'suppressed' AND created_at > ?""",
            (partner, since),
        )
        return int(row[0]) if row else 0

    async def receipts_out(self, states: tuple[str, ...]) -> list[dict[str, Any]]:
        """Receipts we owe, in these states."""
        marks = ", ".join("?" for _ in states)
        keys = (
            "id",
            "partner",
            "to_addr",
            "original_message_id",
            "sop_uids",
            "outcome",
            "detail",
            "state",
            "created_at",
            "content_mic",
        )
        rows = await self.db.fetchall(
            f"SELECT {', '.join(keys)} FROM receipts_out WHERE state IN ({marks}) ORDER BY created_at", states
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def receipt_out_of(self, receipt_id: str) -> tuple[str, list[str]]:
        """(outcome, SOP Instance UIDs) of a receipt we owe, for its audit event (("", []) if unknown)."""
        row = await self.db.fetchone("SELECT outcome, sop_uids FROM receipts_out WHERE id = ?", (receipt_id,))
        return ("", []) if row is None else (str(row[0] or ""), str(row[1] or "").split())

    async def set_receipt_out(
        self, receipt_id: str, state: str, now: float, outcome: str = "", detail: str = ""
    ) -> None:
        """Move a receipt we owe on (and settle its outcome when it waited for the PACS)."""
        if outcome:
            await self.db.execute(
                "UPDATE receipts_out SET state = ?, outcome = ?, detail = ?, updated_at = ? WHERE id = ?",
                (state, outcome, detail[:1000], now, receipt_id),
            )
        else:
            await self.db.execute(
                "UPDATE receipts_out SET state = ?, updated_at = ? WHERE id = ?", (state, now, receipt_id)
            )
