"""Instances: what is stored, where, and whether its file may go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.catalog.base import CatalogBase
from gateway.core.dicominfo import InstanceInfo


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance as the catalog indexes it."""

    info: InstanceInfo
    path: str
    size: int
    sha256: str
    source: str  # "dicom" | "mail" | "manual"
    origin: str  # calling AE title or sending partner
    route: str | None  # partner to send to, None = stays here
    received_at: float
    in_transfer: str | None = None
    called_ae: str | None = None  # DICOM only: the AE title the modality called
    peer: str | None = None  # DICOM only: the modality's address

    @property
    def awaits_routing(self) -> bool:
        """Routing rules apply to what arrives over DICOM (C-STORE, STOW-RS); mail from partners and `send` are not
        routed on (no mail loops between gateways; `send` names its partner)."""
        return self.source == "dicom"


class InstancesRoom(CatalogBase):
    async def record_instances(self, records: list[InstanceRecord]) -> int:
        """Index stored instances (idempotent: a known SOP Instance UID is left as it is); return how many were new."""
        ig = self.db.dialect.insert_ignore
        new = 0
        async with self.db.transaction() as tx:
            for r in records:
                i = r.info
                new += await tx.execute(
                    f"""{ig} INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, path,
                        size, sha256, source, origin, route, in_transfer, received_at, called_ae, peer, routed_at)
                        VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                    (
                        i.sop_instance_uid,
                        i.series_uid,
                        i.study_uid,
                        i.sop_class_uid,
                        i.transfer_syntax,
                        r.path,
                        r.size,
                        r.sha256,
                        r.source,
                        r.origin,
                        r.route,
                        r.in_transfer,
                        r.received_at,
                        r.called_ae,
                        r.peer,
                        None if r.awaits_routing else r.received_at,
                    ),
                )
                # stored again after its file was purged: the row points at the new file
                await tx.execute(
                    "UPDATE instances SET purged_at = NULL, path = ? WHERE sop_uid = ? AND purged_at IS NOT NULL",
                    (r.path, i.sop_instance_uid),
                )
                await tx.execute(
                    f"{ig} INTO series (series_uid, study_uid, modality, series_number) VALUES (?,?,?,?)",
                    (i.series_uid, i.study_uid, i.modality, i.series_number),
                )
                await tx.execute(
                    f"{ig} INTO studies (study_uid, first_seen, last_received) VALUES (?,?,?)",
                    (i.study_uid, r.received_at, r.received_at),
                )
                await tx.execute(
                    "UPDATE studies SET last_received = ? WHERE study_uid = ? AND last_received < ?",
                    (r.received_at, i.study_uid, r.received_at),
                )
        return new

    async def instance(self, sop_uid: str) -> dict[str, Any] | None:
        """One instance row as a dict."""
        row = await self.db.fetchone(
            "SELECT sop_uid, study_uid, series_uid, path, size, sha256, source, origin, route, out_transfer, in_transfer "
            "FROM instances WHERE sop_uid = ?",
            (sop_uid,),
        )
        keys = (
            "sop_uid",
            "study_uid",
            "series_uid",
            "path",
            "size",
            "sha256",
            "source",
            "origin",
            "route",
            "out_transfer",
            "in_transfer",
        )
        return dict(zip(keys, row, strict=True)) if row else None

    async def purgeable(
        self, pacs_count: int, accepted_before: float, limit: int = 1000
    ) -> list[tuple[str, str]]:
        """(sop_uid, path) of stored instances that every one of `pacs_count` PACS accepted before the cut-off."""
        rows = await self.db.fetchall(
            """SELECT f.sop_uid, i.path FROM pacs_forwards f JOIN instances i ON i.sop_uid = f.sop_uid
               WHERE i.purged_at IS NULL GROUP BY f.sop_uid, i.path
               HAVING SUM(CASE WHEN f.state = 'accepted' THEN 1 ELSE 0 END) = COUNT(*) AND COUNT(*) >= ?
                  AND MAX(f.updated_at) < ? LIMIT ?""",
            (pacs_count, accepted_before, limit),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def mark_purged(self, sop_uid: str, now: float) -> None:
        """The instance's file is (about to be) removed; its row stays as history."""
        await self.db.execute("UPDATE instances SET purged_at = ? WHERE sop_uid = ?", (now, sop_uid))

    async def audit_rows(self, sop_uids: list[str]) -> list[tuple[str, str, str]]:
        """(study, SOP class, path) of these instances, for an audit event (unknown ones are left out)."""
        out: list[tuple[str, str, str]] = []
        for k in range(0, len(sop_uids), 200):
            chunk = sop_uids[k : k + 200]
            marks = ", ".join("?" * len(chunk))
            rows = await self.db.fetchall(
                f"SELECT study_uid, sop_class_uid, path FROM instances WHERE sop_uid IN ({marks})",
                tuple(chunk),
            )
            out += [(str(a), str(b), str(c)) for a, b, c in rows]
        return out

    async def study_audit_rows(self, study_uid: str, limit: int = 10000) -> list[tuple[str, str, str]]:
        """(study, SOP class, path) of a study's instances, kept ones first, for an audit event."""
        rows = await self.db.fetchall(
            """SELECT study_uid, sop_class_uid, path FROM instances WHERE study_uid = ?
               ORDER BY CASE WHEN purged_at IS NULL THEN 0 ELSE 1 END LIMIT ?""",
            (study_uid, limit),
        )
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    async def instance_path(self, sop_uid: str) -> str | None:
        """Where an instance's file is, relative to D: (None: not in the catalog)."""
        row = await self.db.fetchone("SELECT path FROM instances WHERE sop_uid = ?", (sop_uid,))
        return None if row is None else str(row[0])

    async def instance_paths(self, *, purged: bool) -> set[str]:
        """Paths of every instance whose file is kept (purged=False) or was removed after the PACS took it."""
        test = "IS NOT NULL" if purged else "IS NULL"
        return {
            str(r[0]) for r in await self.db.fetchall(f"SELECT path FROM instances WHERE purged_at {test}")
        }
