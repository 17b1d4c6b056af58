"""What every room of the catalog shares: the database handle and the checked state moves."""

from __future__ import annotations

from typing import Any

from gateway.catalog.db import Database
from gateway.core.states import MailState, TransferState, check_mail, check_transfer


class CatalogBase:
    """The database handle; state changes go through `core.states`, so an illegal move raises first."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def close(self) -> None:
        await self.db.close()

    async def mail_state(self, mail_id: str) -> str | None:
        """The catalog's state of one mail, either direction (None: no such mail)."""
        row = await self.db.fetchone("SELECT state FROM mails WHERE id = ?", (mail_id,))
        return None if row is None else str(row[0])

    async def _move_transfer(
        self, tx: Any, transfer_id: str, new: TransferState, now: float, error: str | None = None
    ) -> None:
        rows = await tx.fetchall("SELECT state FROM transfers WHERE id = ?", (transfer_id,))
        if not rows:
            raise KeyError(transfer_id)
        check_transfer(rows[0][0], new)
        await tx.execute(
            "UPDATE transfers SET state = ?, updated_at = ?, error = ? WHERE id = ?",
            (new.value, now, error, transfer_id),
        )

    async def _move_mail(self, tx: Any, mail_id: str, new: MailState) -> str:
        rows = await tx.fetchall("SELECT state, transfer_id FROM mails WHERE id = ?", (mail_id,))
        if not rows:
            raise KeyError(mail_id)
        check_mail(rows[0][0], new)
        return str(rows[0][1]) if rows[0][1] is not None else ""

    async def _count_items(self, tx: Any, transfer_id: str) -> int:
        """Refresh a transfer's instance count and bytes from its items; return the count."""
        rows = await tx.fetchall(
            """SELECT COUNT(*), COALESCE(SUM(i.size), 0) FROM transfer_items t
               JOIN instances i ON i.sop_uid = t.sop_uid WHERE t.transfer_id = ?""",
            (transfer_id,),
        )
        count, size = int(rows[0][0]), int(rows[0][1])
        await tx.execute(
            "UPDATE transfers SET instance_count = ?, bytes = ? WHERE id = ?", (count, size, transfer_id)
        )
        return count
