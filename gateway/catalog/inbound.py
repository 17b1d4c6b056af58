"""Inbound mails and transfers: fetched, reassembled, ingested, discarded."""

from __future__ import annotations

from gateway.catalog.base import CatalogBase
from gateway.core.states import MailState, TransferState, check_mail


class InboundRoom(CatalogBase):
    async def discard_in_mail(self, mail_id: str, now: float) -> None:
        """An operator discarded a quarantined inbound mail: its record stays, as `discarded`."""
        async with self.db.transaction() as tx:
            rows = await tx.fetchall("SELECT state FROM mails WHERE id = ? AND direction = 'in'", (mail_id,))
            if not rows or rows[0][0] == MailState.DISCARDED.value:
                return
            check_mail(rows[0][0], MailState.DISCARDED)
            await tx.execute(
                "UPDATE mails SET state = ?, updated_at = ? WHERE id = ?",
                (MailState.DISCARDED.value, now, mail_id),
            )

    async def record_in_mail(self, mail_id: str, path: str, size: int, now: float) -> bool:
        """Register a fetched mail (idempotent); True if it was new."""
        return bool(
            await self.db.execute(
                f"""{self.db.dialect.insert_ignore} INTO mails (id, direction, state, path, size, created_at, updated_at)
                   VALUES (?, 'in', ?, ?, ?, ?, ?)""",
                (mail_id, MailState.FETCHED.value, path, size, now, now),
            )
        )

    async def in_part_done(self, transfer_id: str, part: int) -> bool:
        """True if this part of this inbound transfer was already ingested (a re-delivery)."""
        row = await self.db.fetchone(
            "SELECT COUNT(*) FROM mails WHERE direction = 'in' AND transfer_id = ? AND part = ? AND state = ?",
            (transfer_id, part, MailState.INGESTED.value),
        )
        return bool(row and row[0])

    async def finish_in_mail(
        self,
        mail_id: str,
        new: MailState,
        now: float,
        *,
        transfer_id: str | None = None,
        partner: str | None = None,
        study_uid: str | None = None,
        part: int | None = None,
        total: int | None = None,
        instances: int = 0,
        size: int = 0,
        error: str | None = None,
    ) -> bool:
        """Close an inbound mail; for an ingested one, count it into its transfer. True if the transfer completed."""
        completed = False
        async with self.db.transaction() as tx:
            await self._move_mail(tx, mail_id, new)
            await tx.execute(
                "UPDATE mails SET state = ?, transfer_id = ?, part = ?, total = ?, error = ?, updated_at = ? WHERE id = ?",
                (new.value, transfer_id, part, total, (error or "")[:1000] or None, now, mail_id),
            )
            if new is MailState.INGESTED and transfer_id is not None and partner is not None:
                await tx.execute(
                    f"""{self.db.dialect.insert_ignore} INTO transfers
                        (id, direction, partner, study_uid, state, parts_total, created_at, updated_at)
                        VALUES (?, 'in', ?, ?, ?, ?, ?, ?)""",
                    (transfer_id, partner, study_uid, TransferState.RECEIVING.value, total, now, now),
                )
                rows = await tx.fetchall(
                    "SELECT COUNT(DISTINCT part) FROM mails WHERE direction = 'in' AND transfer_id = ? AND state = ?",
                    (transfer_id, MailState.INGESTED.value),
                )
                done = int(rows[0][0])
                await tx.execute(
                    """UPDATE transfers SET parts_done = ?, instance_count = instance_count + ?, bytes = bytes + ?,
                       updated_at = ? WHERE id = ?""",
                    (done, instances, size, now, transfer_id),
                )
                state = await tx.fetchall("SELECT state FROM transfers WHERE id = ?", (transfer_id,))
                if total and done >= total and state[0][0] == TransferState.RECEIVING.value:
                    await self._move_transfer(tx, transfer_id, TransferState.COMPLETE, now)
                    completed = True
        return completed
