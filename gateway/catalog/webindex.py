"""The DICOMweb index: what QIDO-RS matches on and WADO-RS finds files by (schema migration 6).

Rows are filled in the background from each stored instance's header (`stages.webindex`); a query reads the rows
of the instances that are stored and kept (not purged), joined with where each file is and where it came from
or went (the `direction` and `partner` extensions).
"""

from __future__ import annotations

from typing import Any

from gateway.catalog.base import CatalogBase
from gateway.core import qido

# the index's columns, derived from the attributes QIDO answers on (`core.qido.INDEXED`), never listed by hand
WEB_COLUMNS: tuple[str, ...] = tuple(a.column for a in qido.INDEXED)
FILE_COLUMNS = ("path", "transfer_syntax", "size", "source", "origin", "route")
STUDY_ATTRS = tuple(a.column for a in qido.INDEXED if a.level == qido.STUDY)
SERIES_ATTRS = tuple(a.column for a in qido.INDEXED if a.level == qido.SERIES)


def _where(
    study_uid: str | None,
    series_uid: str | None,
    sop_uid: str | None,
    studies: tuple[str, ...],
    direction: str | None,
    partner: str | None,
) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause shared by the index's queries: kept instances, the UIDs asked, the provenance asked."""
    where, args = ["i.purged_at IS NULL"], []
    for column, value in (("study_uid", study_uid), ("series_uid", series_uid), ("sop_uid", sop_uid)):
        if value is not None:
            where.append(f"w.{column} = ?")
            args.append(value)
    if studies:
        where.append(f"w.study_uid IN ({', '.join('?' for _ in studies)})")
        args += studies
    # sent (or going) to a partner: routed to it by a rule, or in an outbound transfer (`send`, a re-send)
    sent = (
        "(EXISTS (SELECT 1 FROM instance_routes r WHERE r.sop_uid = i.sop_uid{r})"
        " OR EXISTS (SELECT 1 FROM transfer_items ti JOIN transfers t ON t.id = ti.transfer_id"
        " WHERE ti.sop_uid = i.sop_uid AND t.direction = 'out'{t}))"
    )
    if direction == "received":
        where.append("i.source = 'mail'")
    elif direction == "sent":
        where.append(sent.format(r="", t=""))
    if partner:
        where.append(
            "((i.source = 'mail' AND i.origin = ?) OR "
            + sent.format(r=" AND r.partner = ?", t=" AND t.partner = ?")
            + ")"
        )
        args += [partner, partner, partner]
    return " AND ".join(where), tuple(args)


class WebIndexRoom(CatalogBase):
    async def unindexed(self, limit: int = 200) -> list[dict[str, str]]:
        """Kept instances not yet in the DICOMweb index: their UIDs and file."""
        rows = await self.db.fetchall(
            """SELECT i.sop_uid, i.study_uid, i.series_uid, i.sop_class_uid, i.path FROM instances i
               LEFT JOIN web_index w ON w.sop_uid = i.sop_uid
               WHERE w.sop_uid IS NULL AND i.purged_at IS NULL ORDER BY i.received_at LIMIT ?""",
            (limit,),
        )
        keys = ("sop_uid", "study_uid", "series_uid", "sop_class_uid", "path")
        return [dict(zip(keys, (str(v) for v in r), strict=True)) for r in rows]

    async def add_to_web_index(self, rows: list[dict[str, Any]], now: float) -> None:
        """Index these instances (idempotent: a row already there stays)."""
        cols = (*WEB_COLUMNS, "indexed_at")
        marks = ", ".join("?" for _ in cols)
        async with self.db.transaction() as tx:
            for row in rows:
                await tx.execute(
                    f"{self.db.dialect.insert_ignore} INTO web_index ({', '.join(cols)}) VALUES ({marks})",
                    (*(row.get(c) for c in WEB_COLUMNS), now),
                )

    async def web_rows(
        self,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        studies: tuple[str, ...] = (),
        direction: str | None = None,
        partner: str | None = None,
    ) -> list[dict[str, Any]]:
        """Indexed, kept instances (all, or of one study, series or instance, or of these `studies`; received from
        or sent to a partner), with their file and provenance, in study, series and instance order."""
        where, args = _where(study_uid, series_uid, sop_uid, studies, direction, partner)
        keys = (*WEB_COLUMNS, *FILE_COLUMNS)
        rows = await self.db.fetchall(
            f"""SELECT {", ".join("w." + c for c in WEB_COLUMNS)}, {", ".join("i." + c for c in FILE_COLUMNS)}
                FROM web_index w JOIN instances i ON i.sop_uid = w.sop_uid WHERE {where}
                ORDER BY w.study_uid, w.series_number, w.series_uid, w.instance_number, w.sop_uid""",
            args,
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def web_groups(
        self,
        level: str,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        studies: tuple[str, ...] = (),
        direction: str | None = None,
        partner: str | None = None,
    ) -> list[dict[str, Any]]:
        """One row per study (`level` "study") or series ("series") of the kept, indexed instances, aggregated in
        the database: the study's (or series') attributes, its instance count and, per study, its series count
        and modalities (backslash-separated): a study-level query reads one row per study, not per instance."""
        where, args = _where(study_uid, series_uid, None, studies, direction, partner)
        group = "w.study_uid" if level == "study" else "w.series_uid"
        columns = [
            c for c in WEB_COLUMNS if c in (STUDY_ATTRS if level == "study" else STUDY_ATTRS + SERIES_ATTRS)
        ]
        own = group.split(".")[1]
        picked = ", ".join(f"MAX(w.{c})" for c in columns if c != own)
        rows = await self.db.fetchall(
            f"""SELECT {group}, {picked}, COUNT(*), COUNT(DISTINCT w.series_uid),
                       GROUP_CONCAT(DISTINCT w.modality)
                FROM web_index w JOIN instances i ON i.sop_uid = w.sop_uid WHERE {where}
                GROUP BY {group} ORDER BY MAX(w.study_uid), MIN(w.series_number), {group}""",
            args,
        )
        keys = [own, *(c for c in columns if c != own)]
        out = []
        for r in rows:
            row = dict(zip(keys, r[: len(keys)], strict=True))
            count, series, modalities = r[len(keys) :]
            row["instance_count" if level == "study" else "series_instance_count"] = int(count)
            if level == "study":
                row["series_count"] = int(series)
                row["modalities"] = "\\".join(sorted(m for m in str(modalities or "").split(",") if m))
            out.append(row)
        return out
