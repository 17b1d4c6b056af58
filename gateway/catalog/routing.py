"""Routing: instances waiting for a decision, the decisions (one row per instance and partner), and what a study's
instances looked like to routing (for `route --explain` and re-sending)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway.catalog.instances import InstancesRoom

_CHUNK = 200  # rows per statement (well below SQLite's and MariaDB's limits on parameters)
T = TypeVar("T")


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _marks(items: Sequence[object]) -> str:
    return ", ".join("?" for _ in items)


@dataclass(frozen=True)
class RoutableInstance:
    """One stored instance with what routing knows about it."""

    sop_uid: str
    series_uid: str
    path: str
    source: str
    origin: str
    called_ae: str
    peer: str
    routed_at: float | None
    purged: bool


class RoutingRoom(InstancesRoom):
    async def unrouted_studies(self) -> list[tuple[str, int, float]]:
        """Studies with instances not routed yet: (study, how many such instances, when the last instance was
        received), oldest first."""
        rows = await self.db.fetchall(
            """SELECT i.study_uid, COUNT(*), s.last_received FROM instances i JOIN studies s ON s.study_uid = i.study_uid
               WHERE i.routed_at IS NULL
               GROUP BY i.study_uid, s.last_received ORDER BY MIN(i.received_at)"""
        )
        return [(str(r[0]), int(r[1]), float(r[2])) for r in rows]

    async def study_first_seen(self, study_uid: str) -> float | None:
        """When the study's first instance arrived (routing's time windows look at this)."""
        row = await self.db.fetchone("SELECT first_seen FROM studies WHERE study_uid = ?", (study_uid,))
        return None if row is None else float(row[0])

    async def routable(self, study_uid: str, *, unrouted_only: bool) -> list[RoutableInstance]:
        """The study's instances (or only those still waiting for routing), in arrival order."""
        extra = " AND routed_at IS NULL" if unrouted_only else ""
        rows = await self.db.fetchall(
            "SELECT sop_uid, series_uid, path, source, origin, called_ae, peer, routed_at, purged_at "
            f"FROM instances WHERE study_uid = ?{extra} ORDER BY received_at, sop_uid",
            (study_uid,),
        )
        return [
            RoutableInstance(
                str(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                str(r[4] or ""),
                str(r[5] or ""),
                str(r[6] or ""),
                None if r[7] is None else float(r[7]),
                r[8] is not None,
            )
            for r in rows
        ]

    async def record_routes(self, decisions: Mapping[str, Mapping[str, str]], now: float) -> int:
        """Store routing decisions (instance → {partner: rule}) and mark the instances routed, in one transaction;
        return how many (instance, partner) rows are new. A decision already stored is kept (idempotent). Rows go
        in a few hundred per statement: a 4000-instance study is a few dozen round trips, not thousands."""
        ig = self.db.dialect.insert_ignore
        rows = [
            (sop, partner, rule[:128], now) for sop, ps in decisions.items() for partner, rule in ps.items()
        ]
        sops = list(decisions)
        new = 0
        async with self.db.transaction() as tx:
            for chunk in _chunks(rows, _CHUNK):
                new += await tx.execute(
                    f"{ig} INTO instance_routes (sop_uid, partner, rule_name, decided_at) VALUES "
                    + ", ".join("(?, ?, ?, ?)" for _ in chunk),
                    [v for row in chunk for v in row],
                )
            for part in _chunks(sops, _CHUNK):
                await tx.execute(
                    f"UPDATE instances SET routed_at = ? WHERE routed_at IS NULL AND sop_uid IN ({_marks(part)})",
                    [now, *part],
                )
        return new

    async def pending_routes(self) -> list[tuple[str, str]]:
        """(study, partner) pairs with routed instances not yet in a transfer, oldest first."""
        rows = await self.db.fetchall(
            """SELECT i.study_uid, r.partner FROM instance_routes r JOIN instances i ON i.sop_uid = r.sop_uid
               WHERE r.out_transfer IS NULL GROUP BY i.study_uid, r.partner ORDER BY MIN(r.decided_at)"""
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def routes_of(self, study_uid: str) -> dict[str, dict[str, tuple[str, str | None]]]:
        """For each instance of the study: partner → (rule, transfer or None), as decided."""
        rows = await self.db.fetchall(
            """SELECT r.sop_uid, r.partner, r.rule_name, r.out_transfer FROM instance_routes r
               JOIN instances i ON i.sop_uid = r.sop_uid WHERE i.study_uid = ?""",
            (study_uid,),
        )
        out: dict[str, dict[str, tuple[str, str | None]]] = {}
        for sop, partner, rule, transfer in rows:
            out.setdefault(str(sop), {})[str(partner)] = (
                str(rule),
                None if transfer is None else str(transfer),
            )
        return out
