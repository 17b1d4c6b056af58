"""Outbound transfers and their mails: created, packaged, sent, deferred, failed, released."""

from __future__ import annotations

from typing import Any

from gateway.catalog.instances import InstanceRecord
from gateway.catalog.routing import RoutingRoom
from gateway.core.states import MailState, TransferState, check_mail


class OutboundRoom(RoutingRoom):
    """Builds on the instances room: `send` indexes what it hands in before queueing it."""

    async def create_out_transfer(self, transfer_id: str, partner: str, study_uid: str, now: float) -> int:
        """Create a pending transfer carrying every instance of the study routed to the partner and not yet in a
        transfer (the decisions of `record_routes`); return how many it carries."""
        async with self.db.transaction() as tx:
            await tx.execute(
                """INSERT INTO transfers (id, direction, partner, study_uid, state, created_at, updated_at)
                   VALUES (?, 'out', ?, ?, ?, ?, ?)""",
                (transfer_id, partner, study_uid, TransferState.PENDING.value, now, now),
            )
            # set-based: one statement each, whatever the study's size
            await tx.execute(
                """UPDATE instance_routes SET out_transfer = ? WHERE partner = ? AND out_transfer IS NULL
                   AND sop_uid IN (SELECT sop_uid FROM instances WHERE study_uid = ?)""",
                (transfer_id, partner, study_uid),
            )
            await tx.execute(
                """INSERT INTO transfer_items (transfer_id, sop_uid)
                   SELECT out_transfer, sop_uid FROM instance_routes WHERE out_transfer = ?""",
                (transfer_id,),
            )
            # the instance's latest outbound transfer (shown per instance)
            await tx.execute(
                """UPDATE instances SET out_transfer = ?
                   WHERE sop_uid IN (SELECT sop_uid FROM instance_routes WHERE out_transfer = ?)""",
                (transfer_id, transfer_id),
            )
            return await self._count_items(tx, transfer_id)

    async def create_resend_transfer(
        self, transfer_id: str, partner: str, study_uid: str | None, sops: list[str], now: float
    ) -> int:
        """A pending transfer of stored instances to a partner, whatever was routed or sent before (routing
        decisions are left as they are): an operator's re-send, and `send`'s files."""
        async with self.db.transaction() as tx:
            await tx.execute(
                """INSERT INTO transfers (id, direction, partner, study_uid, state, created_at, updated_at)
                   VALUES (?, 'out', ?, ?, ?, ?, ?)""",
                (transfer_id, partner, study_uid, TransferState.PENDING.value, now, now),
            )
            for sop in dict.fromkeys(sops):
                await tx.execute(
                    "INSERT INTO transfer_items (transfer_id, sop_uid) VALUES (?, ?)", (transfer_id, sop)
                )
            return await self._count_items(tx, transfer_id)

    async def enqueue_manual(
        self, records: list[InstanceRecord], transfer_id: str, partner: str, now: float
    ) -> int:
        """Index instances handed in by `send` and put them into a new pending transfer (even if sent before)."""
        await self.record_instances(records)
        sops = [r.info.sop_instance_uid for r in records]
        study = records[0].info.study_uid if records else None
        return await self.create_resend_transfer(transfer_id, partner, study, sops, now)

    async def transfers_in_state(self, direction: str, state: TransferState) -> list[dict[str, Any]]:
        """Transfers of one direction in one state, oldest first."""
        rows = await self.db.fetchall(
            "SELECT id, partner, study_uid, parts_total, parts_done FROM transfers WHERE direction = ? AND state = ? ORDER BY created_at",
            (direction, state.value),
        )
        return [
            dict(zip(("id", "partner", "study_uid", "parts_total", "parts_done"), r, strict=True))
            for r in rows
        ]

    async def transfer(self, transfer_id: str) -> dict[str, Any] | None:
        """One transfer row as a dict."""
        row = await self.db.fetchone(
            "SELECT id, direction, partner, study_uid, state, parts_total, parts_done, instance_count, bytes, created_at, updated_at, error "
            "FROM transfers WHERE id = ?",
            (transfer_id,),
        )
        keys = (
            "id",
            "direction",
            "partner",
            "study_uid",
            "state",
            "parts_total",
            "parts_done",
            "instance_count",
            "bytes",
            "created_at",
            "updated_at",
            "error",
        )
        return dict(zip(keys, row, strict=True)) if row else None

    async def sent_transfers_since(self, since: float) -> list[tuple[str, str, str]]:
        """(transfer, partner, study) of outbound transfers whose every mail was sent since then (the audit
        trail's start-up check that each has its event)."""
        rows = await self.db.fetchall(
            "SELECT id, partner, study_uid FROM transfers WHERE direction = 'out' AND state = ? AND updated_at >= ?",
            (TransferState.SENT.value, since),
        )
        return [(str(a), str(b), str(c or "")) for a, b, c in rows]

    async def transfer_audit_rows(self, transfer_id: str) -> list[tuple[str, str, str]]:
        """(study, SOP class, path) of a transfer's instances, for its audit event."""
        rows = await self.db.fetchall(
            """SELECT i.study_uid, i.sop_class_uid, i.path FROM transfer_items t
               JOIN instances i ON i.sop_uid = t.sop_uid WHERE t.transfer_id = ?""",
            (transfer_id,),
        )
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    async def transfer_instances(self, transfer_id: str) -> list[tuple[str, str, int]]:
        """(sop_uid, path, size) of an outbound transfer, in a stable order (series, then path)."""
        rows = await self.db.fetchall(
            """SELECT i.sop_uid, i.path, i.size FROM transfer_items t JOIN instances i ON i.sop_uid = t.sop_uid
               WHERE t.transfer_id = ? ORDER BY i.series_uid, i.path""",
            (transfer_id,),
        )
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def set_transfer_state(
        self, transfer_id: str, new: TransferState, now: float, error: str | None = None
    ) -> None:
        """Move a transfer to a new state (checked against the table)."""
        async with self.db.transaction() as tx:
            await self._move_transfer(tx, transfer_id, new, now, error)

    async def fail_pending_transfer(self, transfer_id: str, now: float, error: str) -> bool:
        """Packaging failed: the transfer fails, but only while it is still pending. False when it is no longer
        (another cluster node packaged it meanwhile: its mails are queued, and this failure says nothing)."""
        async with self.db.transaction() as tx:
            rows = await tx.fetchall("SELECT state FROM transfers WHERE id = ?", (transfer_id,))
            if not rows or rows[0][0] != TransferState.PENDING.value:
                return False
            await self._move_transfer(tx, transfer_id, TransferState.FAILED, now, error)
            return True

    async def add_out_mails(
        self,
        transfer_id: str,
        mails: list[tuple[str, int, int, str, int]],
        now: float,
        *,
        mdn_ids: list[str] | None = None,
        receipts: bool = False,
        bytes_wire: int | None = None,
        proofs: dict[str, tuple[str, dict[str, str]]] | None = None,
    ) -> None:
        """Record the built mails (id, part, total, path, size) and mark the transfer packaged, atomically.

        `mdn_ids` (one per mail) are the Message-IDs receipts will name; `receipts` says whether they are awaited;
        `proofs` holds, per such Message-ID, what its receipt must prove: the content's digest and each
        instance's SHA-256 as it went into the mail.
        """
        proofs = proofs or {}
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM mails WHERE transfer_id = ? AND direction = 'out'", (transfer_id,))
            await tx.execute("DELETE FROM out_items WHERE transfer_id = ?", (transfer_id,))
            rows = [
                (transfer_id, sop, mdn_id, sha) for mdn_id, (_, d) in proofs.items() for sop, sha in d.items()
            ]
            for i in range(0, len(rows), 200):  # a few statements for a study of thousands
                chunk = rows[i : i + 200]
                await tx.execute(
                    "INSERT INTO out_items (transfer_id, sop_uid, mdn_id, sha256) VALUES "
                    + ", ".join("(?, ?, ?, ?)" for _ in chunk),
                    tuple(v for row in chunk for v in row),
                )
            for n, (mail_id, part, total, path, size) in enumerate(mails):
                await tx.execute(
                    """INSERT INTO mails (id, direction, transfer_id, part, total, state, path, size, created_at,
                       updated_at, mdn_id, content_mic) VALUES (?, 'out', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        mail_id,
                        transfer_id,
                        part,
                        total,
                        MailState.QUEUED.value,
                        path,
                        size,
                        now,
                        now,
                        mdn_ids[n] if mdn_ids else mail_id,
                        proofs[mdn_ids[n]][0] if mdn_ids and mdn_ids[n] in proofs else None,
                    ),
                )
            await tx.execute(
                "UPDATE transfers SET parts_total = ?, receipt = ?, bytes_wire = ? WHERE id = ?",
                (len(mails), "awaited" if receipts else "not-requested", bytes_wire, transfer_id),
            )
            await self._move_transfer(tx, transfer_id, TransferState.PACKAGED, now)

    async def mark_mail_sent(self, mail_id: str, node: str, now: float) -> bool:
        """Record a 250 for one mail; when it was the last of its transfer, the transfer becomes sent (→ True)."""
        async with self.db.transaction() as tx:
            transfer_id = await self._move_mail(tx, mail_id, MailState.SENT)
            await tx.execute(
                "UPDATE mails SET state = ?, node = ?, updated_at = ?, error = NULL, attempts = attempts + 1 WHERE id = ?",
                (MailState.SENT.value, node, now, mail_id),
            )
            rows = await tx.fetchall(
                "SELECT COUNT(*), SUM(CASE WHEN state = ? THEN 1 ELSE 0 END) FROM mails WHERE transfer_id = ? AND direction = 'out'",
                (MailState.SENT.value, transfer_id),
            )
            total, sent = int(rows[0][0]), int(rows[0][1] or 0)
            await tx.execute(
                "UPDATE transfers SET parts_done = ?, updated_at = ? WHERE id = ?", (sent, now, transfer_id)
            )
            if total and sent == total:
                await self._move_transfer(tx, transfer_id, TransferState.SENT, now)
                return True
        return False

    async def defer_mail(
        self, mail_id: str, attempts: int, next_attempt: float, error: str, now: float
    ) -> None:
        """Record a transient failure; the mail stays queued until `next_attempt`."""
        async with self.db.transaction() as tx:
            await self._move_mail(tx, mail_id, MailState.QUEUED)
            await tx.execute(
                "UPDATE mails SET attempts = ?, next_attempt = ?, error = ?, updated_at = ? WHERE id = ?",
                (attempts, next_attempt, error[:1000], now, mail_id),
            )

    async def fail_mail(self, mail_id: str, error: str, now: float) -> None:
        """Record a permanent failure of a mail; its transfer fails with the same reason."""
        async with self.db.transaction() as tx:
            transfer_id = await self._move_mail(tx, mail_id, MailState.FAILED)
            await tx.execute(
                "UPDATE mails SET state = ?, error = ?, updated_at = ? WHERE id = ?",
                (MailState.FAILED.value, error[:1000], now, mail_id),
            )
            await self._move_transfer(tx, transfer_id, TransferState.FAILED, now, error[:1000])

    async def release_mail(self, mail_id: str, now: float) -> None:
        """An operator released a held mail: outbound failed → queued (its transfer → packaged), inbound → fetched."""
        async with self.db.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT direction, state, transfer_id FROM mails WHERE id = ?", (mail_id,)
            )
            if not rows:
                return
            direction, state, transfer_id = rows[0]
            new = MailState.QUEUED if direction == "out" else MailState.FETCHED
            if state == new.value:
                return
            check_mail(state, new)
            await tx.execute(
                "UPDATE mails SET state = ?, error = NULL, next_attempt = NULL, updated_at = ? WHERE id = ?",
                (new.value, now, mail_id),
            )
            if direction == "out" and transfer_id:
                t = await tx.fetchall("SELECT state FROM transfers WHERE id = ?", (transfer_id,))
                if t and t[0][0] == TransferState.FAILED.value:
                    await self._move_transfer(tx, str(transfer_id), TransferState.PACKAGED, now)
