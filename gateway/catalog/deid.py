"""De-identification's bookkeeping: the key that replaces UIDs for partners that must not know the patient, and the
replacements made, so that a result coming back is matched to the original study (`gateway.core.deid`)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from gateway.catalog.base import CatalogBase


class DeidRoom(CatalogBase):
    async def deid_key(self) -> bytes:
        """The gateway's de-identification key (made on first use; kept in the catalog and its backups only)."""
        ig = self.db.dialect.insert_ignore
        await self.db.execute(f"{ig} INTO secrets (name, value) VALUES ('deid', ?)", (secrets.token_hex(32),))
        row = await self.db.fetchone("SELECT value FROM secrets WHERE name = 'deid'")
        assert row is not None
        return bytes.fromhex(str(row[0]))

    async def record_deid_map(
        self, partner: str, study_uid: str, pairs: Iterable[tuple[str, str, str]], now: float
    ) -> None:
        """Remember replacements (kind, original UID, replacement) made for a partner (idempotent)."""
        ig = self.db.dialect.insert_ignore
        rows = list(pairs)
        async with self.db.transaction() as tx:
            for n in range(0, len(rows), 200):
                chunk = rows[n : n + 200]
                await tx.execute(
                    f"{ig} INTO deid_map (partner, deid_uid, original_uid, kind, study_uid, created_at) VALUES "
                    + ", ".join("(?, ?, ?, ?, ?, ?)" for _ in chunk),
                    [v for kind, orig, new in chunk for v in (partner, new, orig, kind, study_uid, now)],
                )

    async def deid_originals(self, partner: str, study_deid_uid: str) -> tuple[str, dict[str, str]] | None:
        """For a study UID a partner got from us: the original study and every replacement made for it
        (replacement → original), or None when the UID is not one of ours."""
        row = await self.db.fetchone(
            "SELECT study_uid FROM deid_map WHERE partner = ? AND deid_uid = ? AND kind = 'study'",
            (partner, study_deid_uid),
        )
        if row is None:
            return None
        rows = await self.db.fetchall(
            "SELECT deid_uid, original_uid FROM deid_map WHERE partner = ? AND study_uid = ?",
            (partner, str(row[0])),
        )
        return str(row[0]), {str(a): str(b) for a, b in rows}
