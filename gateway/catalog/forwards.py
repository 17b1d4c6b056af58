"""Forwarding to the local PACS: what is due, what each PACS answered."""

from __future__ import annotations

from typing import Any

from gateway.catalog.base import CatalogBase


class ForwardsRoom(CatalogBase):
    async def queue_forwards(self, sop_uids: list[str], pacs_names: list[str], now: float) -> None:
        """Every instance goes to every configured PACS (idempotent)."""
        async with self.db.transaction() as tx:
            for sop in sop_uids:
                for pacs in pacs_names:
                    await tx.execute(
                        f"""{self.db.dialect.insert_ignore} INTO pacs_forwards
                            (sop_uid, pacs, state, created_at, updated_at) VALUES (?, ?, 'pending', ?, ?)""",
                        (sop, pacs, now, now),
                    )

    async def due_forwards(self, now: float, limit: int = 200) -> list[dict[str, Any]]:
        """Forwards to try now, with what the SCU needs to propose and send."""
        rows = await self.db.fetchall(
            """SELECT f.sop_uid, f.pacs, f.attempts, i.sop_class_uid, i.transfer_syntax, i.path
               FROM pacs_forwards f JOIN instances i ON i.sop_uid = f.sop_uid
               WHERE f.state IN ('pending', 'retry') AND (f.next_attempt IS NULL OR f.next_attempt <= ?)
               ORDER BY f.created_at, i.series_uid, i.path LIMIT ?""",
            (now, limit),
        )
        keys = ("sop_uid", "pacs", "attempts", "sop_class_uid", "transfer_syntax", "path")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def record_forward(
        self,
        sop_uid: str,
        pacs: str,
        state: str,
        attempts: int,
        now: float,
        *,
        status: int | None = None,
        next_attempt: float | None = None,
        error: str | None = None,
    ) -> None:
        """The outcome of one forward: accepted, retry (with next_attempt) or rejected (for good)."""
        await self.db.execute(
            """UPDATE pacs_forwards SET state = ?, attempts = ?, status = ?, next_attempt = ?, error = ?, updated_at = ?
               WHERE sop_uid = ? AND pacs = ?""",
            (state, attempts, status, next_attempt, (error or "")[:1000] or None, now, sop_uid, pacs),
        )

    async def forward_outcomes(self, sop_uids: list[str]) -> list[tuple[str, str, int | None, str | None]]:
        """(sop, state, status, error) of every PACS forward of these instances."""
        out: list[tuple[str, str, int | None, str | None]] = []
        for i in range(0, len(sop_uids), 200):
            chunk = sop_uids[i : i + 200]
            marks = ", ".join("?" for _ in chunk)
            rows = await self.db.fetchall(
                f"SELECT sop_uid, state, status, error FROM pacs_forwards WHERE sop_uid IN ({marks})",
                tuple(chunk),
            )
            out += [(str(r[0]), str(r[1]), r[2], r[3]) for r in rows]
        return out
