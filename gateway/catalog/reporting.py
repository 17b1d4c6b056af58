"""Read-only queries for status, the web page, check_mk and backups: one read model, no writes."""

from __future__ import annotations

from collections import Counter
from typing import Any

from gateway.catalog.base import CatalogBase
from gateway.core.proof import chain

# A forward's state as the views name it: with storage commitment, "accepted" is "committed" and a refusal after
# the C-STORE succeeded is "not-committed"
FORWARD_STATE = """(CASE WHEN f.commitment = 'committed' AND f.state = 'accepted' THEN 'committed'
    WHEN f.commitment = 'failed' AND f.state = 'rejected' THEN 'not-committed' ELSE f.state END)"""


class ReportingRoom(CatalogBase):
    async def status(self, limit: int = 50) -> dict[str, Any]:
        """Counts and the most recent transfers and studies, for `status` (no patient data: the DICOMweb index, the one table that holds some, is not read here).

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
                      created_at, updated_at, error, receipt, receipt_detail, bytes_wire, receipt_conflict,
                      proof, proof_detail
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
            f"SELECT f.pacs, {FORWARD_STATE}, COUNT(*) FROM pacs_forwards f GROUP BY f.pacs, {FORWARD_STATE}"
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
            "proof",
            "proof_detail",
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
                f"""SELECT i.in_transfer, f.pacs, {FORWARD_STATE}, COUNT(*), MAX(f.error) FROM pacs_forwards f
                    JOIN instances i ON i.sop_uid = f.sop_uid WHERE i.in_transfer IN ({marks})
                    GROUP BY i.in_transfer, f.pacs, {FORWARD_STATE} ORDER BY f.pacs, {FORWARD_STATE}""",
                inbound,
            ):
                per_transfer.setdefault(str(tid), []).append(
                    {"pacs": pacs, "state": state, "count": int(count), "error": error}
                )
        for t in listed:
            t["pacs"] = per_transfer.get(str(t["id"]), [])
        await self._partner_chain(listed)
        return {
            "transfers_by_state": [{"direction": d, "state": s, "count": int(c)} for d, s, c in counts],
            "mails_by_state": [{"direction": d, "state": s, "count": int(c)} for d, s, c in mails],
            "transfers": listed,
            "studies": [dict(zip(skeys, r, strict=True)) for r in studies],
            "pacs_forwards": [{"pacs": p, "state": st, "count": int(c)} for p, st, c in forwards],
            "receipts_out": [{"state": st, "outcome": o, "count": int(c)} for st, o, c in receipts],
        }

    async def _partner_chain(self, listed: list[dict[str, Any]]) -> None:
        """Sent transfers: what the partner's receipts said of each instance (`partner_pacs`: state → count, the
        reasons, and the instances that are not committed), and the chain as it reads (`core.proof.chain`)."""
        outbound = [str(t["id"]) for t in listed if t["direction"] == "out"]
        states: dict[str, Counter[str]] = {}
        missing: dict[str, list[str]] = {}
        pending: dict[str, int] = {}
        proofs: dict[str, Counter[str]] = {}
        for i in range(0, len(outbound), 200):
            chunk = outbound[i : i + 200]
            marks = ", ".join("?" for _ in chunk)
            for tid, pacs, sop, reason in await self.db.fetchall(
                f"""SELECT transfer_id, partner_pacs, sop_uid, partner_reason FROM out_items
                    WHERE transfer_id IN ({marks}) AND partner_pacs IS NOT NULL ORDER BY sop_uid""",
                tuple(chunk),
            ):
                states.setdefault(str(tid), Counter())[str(pacs)] += 1
                if pacs not in ("committed", "stored", "none"):
                    missing.setdefault(str(tid), []).append(
                        f"{sop} ({pacs}{': ' + reason if reason else ''})"
                    )
            for tid, p, n in await self.db.fetchall(
                f"""SELECT transfer_id, COALESCE(proof, ''), COUNT(*) FROM mails WHERE direction = 'out'
                    AND transfer_id IN ({marks}) GROUP BY transfer_id, COALESCE(proof, '')""",
                tuple(chunk),
            ):
                if p:
                    proofs.setdefault(str(tid), Counter())[str(p)] += int(n)
                else:
                    pending[str(tid)] = int(n)
        for t in listed:
            tid = str(t["id"])
            if t["direction"] != "out" or tid not in proofs:
                continue
            content, pacs_said = chain(proofs[tid], states.get(tid, Counter()), pending.get(tid, 0))
            t["partner_pacs"] = dict(states.get(tid, {}))
            t["chain"] = [s for s in (content, pacs_said) if s]
            t["not_committed"] = missing.get(tid, [])[:50]

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
        receipts["differs"] = await count(
            "SELECT COUNT(*) FROM transfers WHERE direction = 'out' AND proof = 'differs' AND updated_at > ?",
            week,
        )
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
