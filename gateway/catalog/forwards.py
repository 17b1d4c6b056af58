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
            """SELECT f.sop_uid, f.pacs, f.attempts, i.sop_class_uid, i.transfer_syntax, i.path, i.source, i.origin,
                      i.study_uid
               FROM pacs_forwards f JOIN instances i ON i.sop_uid = f.sop_uid
               WHERE f.state IN ('pending', 'retry') AND (f.next_attempt IS NULL OR f.next_attempt <= ?)
               ORDER BY f.created_at, i.series_uid, i.path LIMIT ?""",
            (now, limit),
        )
        keys = (
            "sop_uid",
            "pacs",
            "attempts",
            "sop_class_uid",
            "transfer_syntax",
            "path",
            "source",
            "origin",
            "study_uid",
        )
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
        """The outcome of one C-STORE: accepted, stored (awaiting storage commitment), retry (with next_attempt)
        or rejected (for good)."""
        await self.db.execute(
            """UPDATE pacs_forwards SET state = ?, attempts = ?, status = ?, next_attempt = ?, error = ?, updated_at = ?,
               commitment = ?, commit_txn = NULL, commit_requested = NULL WHERE sop_uid = ? AND pacs = ?""",
            (
                state,
                attempts,
                status,
                next_attempt,
                (error or "")[:1000] or None,
                now,
                "due" if state == "stored" else None,
                sop_uid,
                pacs,
            ),
        )

    async def receipt_facts(
        self, sop_uids: list[str]
    ) -> dict[str, tuple[str | None, list[tuple[str, str, str | None, str | None]]]]:
        """What a receipt reports per instance: its file (None: not in the catalog, or purged) and every PACS
        forward of it as (pacs, state, commitment, error)."""
        out: dict[str, tuple[str | None, list[tuple[str, str, str | None, str | None]]]] = {
            sop: (None, []) for sop in sop_uids
        }
        for i in range(0, len(sop_uids), 200):
            chunk = sop_uids[i : i + 200]
            marks = ", ".join("?" for _ in chunk)
            for sop, path, purged in await self.db.fetchall(
                f"SELECT sop_uid, path, purged_at FROM instances WHERE sop_uid IN ({marks})", tuple(chunk)
            ):
                out[str(sop)] = (None if purged is not None else str(path), out[str(sop)][1])
            for sop, pacs, state, commitment, error in await self.db.fetchall(
                f"""SELECT sop_uid, pacs, state, commitment, error FROM pacs_forwards
                    WHERE sop_uid IN ({marks}) ORDER BY pacs""",
                tuple(chunk),
            ):
                out[str(sop)][1].append((str(pacs), str(state), commitment, error))
        return out

    async def record_commitment(
        self,
        sop_uids: list[str],
        pacs: str,
        state: str,
        commitment: str | None,
        now: float,
        *,
        attempts_added: int = 0,
        next_attempt: float | None = None,
        error: str | None = None,
        txn: str | None = None,
    ) -> None:
        """Storage commitment moves of these forwards: C-STORE done (`stored`, commitment `due`), asked
        (`requested` under `txn`, at `now`), `committed` (state `accepted`), or failed (state `retry` or
        `rejected`, with the PACS's reason)."""
        for i in range(0, len(sop_uids), 200):
            chunk = sop_uids[i : i + 200]
            marks = ", ".join("?" for _ in chunk)
            await self.db.execute(
                f"""UPDATE pacs_forwards SET state = ?, commitment = ?, attempts = attempts + ?, next_attempt = ?,
                    error = ?, commit_txn = ?, commit_requested = ?, updated_at = ?
                    WHERE pacs = ? AND sop_uid IN ({marks})""",
                (
                    state,
                    commitment,
                    attempts_added,
                    next_attempt,
                    (error or "")[:1000] or None,
                    txn,
                    now if commitment == "requested" else None,
                    now,
                    pacs,
                    *chunk,
                ),
            )

    async def commitments_due(self, pacs: str, now: float, limit: int) -> list[tuple[str, str, int]]:
        """(sop, SOP class, attempts) of instances the PACS stored and has not yet been asked to commit."""
        rows = await self.db.fetchall(
            """SELECT f.sop_uid, i.sop_class_uid, f.attempts FROM pacs_forwards f
               JOIN instances i ON i.sop_uid = f.sop_uid
               WHERE f.pacs = ? AND f.state = 'stored' AND f.commitment = 'due'
               AND (f.next_attempt IS NULL OR f.next_attempt <= ?) ORDER BY f.updated_at LIMIT ?""",
            (pacs, now, limit),
        )
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def commitments_asked(
        self, pacs: str, *, txn: str | None = None, before: float | None = None
    ) -> list[tuple[str, int]]:
        """(sop, attempts) of requested commitments: of one transaction, or asked before a time."""
        if txn is not None:
            rows = await self.db.fetchall(
                """SELECT sop_uid, attempts FROM pacs_forwards WHERE pacs = ? AND commit_txn = ?
                   AND commitment = 'requested'""",
                (pacs, txn),
            )
        else:
            rows = await self.db.fetchall(
                """SELECT sop_uid, attempts FROM pacs_forwards WHERE pacs = ? AND commitment = 'requested'
                   AND commit_requested < ?""",
                (pacs, before),
            )
        return [(str(r[0]), int(r[1])) for r in rows]
