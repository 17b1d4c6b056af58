"""Read-only queries for status, the web page, check_mk and backups: one read model, no writes."""

from __future__ import annotations

from typing import Any

from gateway.catalog.base import CatalogBase


class ReportingRoom(CatalogBase):
    async def status(self, limit: int = 50) -> dict[str, Any]:
        """Counts and the most recent transfers and studies, for `status` (no patient data is stored at all).

        Size: one read of everything the status shows, on one connection; each query is a few lines.
        """
        counts = await self.db.fetchall(
            "SELECT direction, state, COUNT(*) FROM transfers GROUP BY direction, state"
        )
        mails = await self.db.fetchall(
            "SELECT direction, state, COUNT(*) FROM mails GROUP BY direction, state"
        )
        transfers = await self.db.fetchall(
            """SELECT id, direction, partner, study_uid, state, parts_done, parts_total, instance_count, bytes,
                      created_at, updated_at, error, receipt, receipt_detail, bytes_wire, receipt_conflict
               FROM transfers ORDER BY updated_at DESC LIMIT ?""",
            (limit,),
        )
        studies = await self.db.fetchall(
            """SELECT s.study_uid, COUNT(i.sop_uid), COUNT(DISTINCT i.series_uid), COALESCE(SUM(i.size), 0),
                      MIN(i.source), s.last_received
               FROM studies s JOIN instances i ON i.study_uid = s.study_uid
               GROUP BY s.study_uid, s.last_received ORDER BY s.last_received DESC LIMIT ?""",
            (limit,),
        )
        forwards = await self.db.fetchall(
            "SELECT pacs, state, COUNT(*) FROM pacs_forwards GROUP BY pacs, state"
        )
        tkeys = (
            "id",
            "direction",
            "partner",
            "study_uid",
            "state",
            "parts_done",
            "parts_total",
            "instances",
            "bytes",
            "created_at",
            "updated_at",
            "error",
            "receipt",
            "receipt_detail",
            "bytes_wire",
            "receipt_conflict",
        )
        receipts = await self.db.fetchall(
            "SELECT state, outcome, COUNT(*) FROM receipts_out GROUP BY state, outcome"
        )
        skeys = ("study_uid", "instances", "series", "bytes", "source", "last_received")
        listed = [dict(zip(tkeys, r, strict=True)) for r in transfers]
        inbound = [str(t["id"]) for t in listed if t["direction"] == "in"]
        per_transfer: dict[str, list[dict[str, Any]]] = {}
        if inbound:
            marks = ", ".join("?" for _ in inbound)
            for tid, pacs, state, count, error in await self.db.fetchall(
                f"""SELECT i.in_transfer, f.pacs, f.state, COUNT(*), MAX(f.error) FROM pacs_forwards f
                    JOIN instances i ON i.sop_uid = f.sop_uid WHERE i.in_transfer IN ({marks})
                    GROUP BY i.in_transfer, f.pacs, f.state ORDER BY f.pacs, f.state""",
                inbound,
            ):
                per_transfer.setdefault(str(tid), []).append(
                    {"pacs": pacs, "state": state, "count": int(count), "error": error}
                )
        for t in listed:
            t["pacs"] = per_transfer.get(str(t["id"]), [])
        return {
            "transfers_by_state": [{"direction": d, "state": s, "count": int(c)} for d, s, c in counts],
            "mails_by_state": [{"direction": d, "state": s, "count": int(c)} for d, s, c in mails],
            "transfers": listed,
            "studies": [dict(zip(skeys, r, strict=True)) for r in studies],
            "pacs_forwards": [{"pacs": p, "state": st, "count": int(c)} for p, st, c in forwards],
            "receipts_out": [{"state": st, "outcome": o, "count": int(c)} for st, o, c in receipts],
        }

    async def recent_studies(self, limit: int = 10) -> list[dict[str, Any]]:
        """The latest studies with their series (uid, modality, count, one SOP Instance UID for a thumbnail)."""
        studies = await self.db.fetchall(
            """SELECT s.study_uid, s.last_received, COUNT(i.sop_uid), MIN(i.source)
               FROM studies s JOIN instances i ON i.study_uid = s.study_uid
               GROUP BY s.study_uid, s.last_received ORDER BY s.last_received DESC LIMIT ?""",
            (limit,),
        )
        out = []
        for study_uid, last, count, source in studies:
            series = await self.db.fetchall(
                """SELECT i.series_uid, MAX(se.modality), COUNT(*), MIN(i.sop_uid) FROM instances i
                   LEFT JOIN series se ON se.series_uid = i.series_uid WHERE i.study_uid = ?
                   GROUP BY i.series_uid ORDER BY i.series_uid""",
                (study_uid,),
            )
            out.append(
                {
                    "uid": study_uid,
                    "last": last,
                    "count": count,
                    "source": source,
                    "series": [tuple(r) for r in series],
                }
            )
        return out

    async def monitoring_counts(self, now: float, reassembly_deadline: float) -> dict[str, Any]:
        """What check_mk judges: instances in the last day, failed transfers and receipts of the last week, PACS
        forwards by state, and inbound sets still missing parts after the reassembly deadline."""
        week = now - 7 * 86400

        async def count(sql: str, *args: object) -> int:
            row = await self.db.fetchone(sql, args)
            return int(row[0]) if row and row[0] is not None else 0

        receipts = {
            str(receipt): int(n)
            for receipt, n in await self.db.fetchall(
                "SELECT receipt, COUNT(*) FROM transfers WHERE direction = 'out' AND receipt IS NOT NULL "
                "AND updated_at > ? GROUP BY receipt",
                (week,),
            )
        }
        receipts["contradicted"] = await count(
            "SELECT COUNT(*) FROM transfers WHERE direction = 'out' AND receipt_conflict IS NOT NULL "
            "AND receipt_at > ?",
            week,
        )
        return {
            "recent": await count("SELECT COUNT(*) FROM instances WHERE received_at > ?", now - 86400),
            "failed": await count(
                "SELECT COUNT(*) FROM transfers WHERE direction = 'out' AND state = 'failed' AND updated_at > ?",
                week,
            ),
            "forwards": {
                str(state): int(n)
                for state, n in await self.db.fetchall(
                    "SELECT state, COUNT(*) FROM pacs_forwards GROUP BY state"
                )
            },
            "stuck_in": await count(
                "SELECT COUNT(*) FROM transfers WHERE direction = 'in' AND state = 'receiving' AND created_at < ?",
                now - reassembly_deadline,
            ),
            "receipts": receipts,
        }
