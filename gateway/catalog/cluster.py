"""The cluster's room: node heartbeats and claims (docs/cluster.md).

A claim says which node works on one piece of work (`kind`, `item`) until `lease_until`. It is taken by one
transaction that reads the row and then inserts it, or updates it only where it still holds what was read (the
same node and fence): two nodes that race both see the row free, and only one commit succeeds; the other fails
with a duplicate key, a lock wait, or on Galera a certification failure (1213), all of which mean "lost". A claim
is never taken while its lease runs; every take raises `fence`, so a node that lost its claim while paused can
tell (`holds`) that its result no longer counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.catalog.base import CatalogBase
from gateway.catalog.db import is_conflict


@dataclass(frozen=True)
class Claim:
    kind: str
    item: str
    node: str
    fence: int
    lease_until: float


class ClusterRoom(CatalogBase):
    """Heartbeats and claims of the nodes that share this catalog."""

    async def take_claim(self, kind: str, item: str, node: str, now: float, lease: float) -> int | None:
        """Claim `(kind, item)` for `node` until `now + lease` if nobody holds it (or its holder's lease ran
        out); the new fence, or None when another node holds it or won the race."""
        try:
            async with self.db.transaction() as tx:
                rows = await tx.fetchall(
                    "SELECT node, fence, lease_until FROM claims WHERE kind = ? AND item = ?", (kind, item)
                )
                if not rows:
                    await tx.execute(
                        """INSERT INTO claims (kind, item, node, fence, taken_at, lease_until)
                           VALUES (?, ?, ?, 1, ?, ?)""",
                        (kind, item, node, now, now + lease),
                    )
                    return 1
                holder, fence, until = str(rows[0][0]), int(rows[0][1]), float(rows[0][2])
                if until >= now:
                    return None  # held, by another node or (a role it already has) by this one
                changed = await tx.execute(
                    """UPDATE claims SET node = ?, fence = ?, taken_at = ?, lease_until = ?
                       WHERE kind = ? AND item = ? AND node = ? AND fence = ?""",
                    (node, fence + 1, now, now + lease, kind, item, holder, fence),
                )
                if changed != 1:
                    return None
                return fence + 1
        except Exception as exc:
            if is_conflict(exc):
                return None
            raise

    async def release_claim(self, kind: str, item: str, node: str, fence: int) -> bool:
        """Give a claim back (its work is done); False when it was no longer ours."""
        return (
            await self.db.execute(
                "DELETE FROM claims WHERE kind = ? AND item = ? AND node = ? AND fence = ?",
                (kind, item, node, fence),
            )
            == 1
        )

    async def holds(self, kind: str, item: str, node: str, fence: int, now: float) -> bool:
        """Whether `node` still holds this claim with this fence, inside its lease."""
        row = await self.db.fetchone(
            "SELECT lease_until FROM claims WHERE kind = ? AND item = ? AND node = ? AND fence = ?",
            (kind, item, node, fence),
        )
        return row is not None and float(row[0]) >= now

    async def drop_claims(self, node: str) -> int:
        """At a node's start: every claim its previous run left is free at once (that run is gone: the node's
        own lock on D: says so), so that its work is taken up without waiting for the lease."""
        return await self.db.execute("DELETE FROM claims WHERE node = ?", (node,))

    async def heartbeat(
        self,
        node: str,
        host: str,
        pid: int,
        started: float,
        now: float,
        lease: float,
        counters: dict[str, Any],
    ) -> list[Claim]:
        """Renew every claim `node` holds to `now + lease` and record that it is alive (with its counters, no
        patient data); the claims it still holds (one taken over while it could not renew is not among them)."""
        text = json.dumps(counters, sort_keys=True)
        async with self.db.transaction() as tx:
            await tx.execute("UPDATE claims SET lease_until = ? WHERE node = ?", (now + lease, node))
            updated = await tx.execute(
                """UPDATE cluster_nodes SET host = ?, pid = ?, started_at = ?, heartbeat = ?, counters = ?
                   WHERE node = ?""",
                (host, pid, started, now, text, node),
            )
            if not updated:
                await tx.execute(
                    """INSERT INTO cluster_nodes (node, host, pid, started_at, heartbeat, counters)
                       VALUES (?, ?, ?, ?, ?, ?)""",
                    (node, host, pid, started, now, text),
                )
            rows = await tx.fetchall(
                "SELECT kind, item, node, fence, lease_until FROM claims WHERE node = ?", (node,)
            )
        return [Claim(str(k), str(i), str(n), int(f), float(u)) for k, i, n, f, u in rows]

    async def forget_node(self, node: str, silent_since: float) -> int | None:
        """Remove a node for good: its row and its (lapsed) claims, in one transaction, only while its last
        heartbeat is older than `silent_since` (a node that came back meanwhile is kept). How many claims went, or
        None when the node was not removed."""
        async with self.db.transaction() as tx:
            removed = await tx.execute(
                "DELETE FROM cluster_nodes WHERE node = ? AND heartbeat < ?", (node, silent_since)
            )
            if removed != 1:
                return None
            return await tx.execute("DELETE FROM claims WHERE node = ?", (node,))

    async def claims(self, kind: str | None = None) -> list[Claim]:
        """Every claim (of one kind), for take-over and status."""
        sql = "SELECT kind, item, node, fence, lease_until FROM claims"
        rows = await (self.db.fetchall(sql + " WHERE kind = ?", (kind,)) if kind else self.db.fetchall(sql))
        return [Claim(str(k), str(i), str(n), int(f), float(u)) for k, i, n, f, u in rows]

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        """Every node that ever beat: name, host, pid, start, last heartbeat and its counters."""
        rows = await self.db.fetchall(
            "SELECT node, host, pid, started_at, heartbeat, counters FROM cluster_nodes ORDER BY node"
        )
        return [
            {
                "node": str(n),
                "host": str(h),
                "pid": int(p),
                "started": float(s),
                "heartbeat": float(b),
                "counters": json.loads(c) if c else {},
            }
            for n, h, p, s, b, c in rows
        ]

    async def galera(self) -> dict[str, str]:
        """The Galera member's view of its cluster (size, state, primary or not); empty on SQLite or a MariaDB
        without wsrep."""
        if self.db.dialect.name != "mysql":
            return {}
        rows = await self.db.fetchall(
            """SHOW GLOBAL STATUS WHERE Variable_name IN
               ('wsrep_cluster_size', 'wsrep_cluster_status', 'wsrep_local_state_comment', 'wsrep_ready',
                'wsrep_connected')"""
        )
        return {str(k).removeprefix("wsrep_"): str(v) for k, v in rows}
