"""The web port's access lines (`gateway.access`: DICOMweb, WADO, the viewer, the status page and its thumbnails)
turned into audit events: IHE ATNA "Query" and "DICOM Instances Accessed" (a STOW-RS store: "DICOM Instances
Transferred"), each naming the user, the address, the study and its patient.

A request is logged at once (one small append, `gateway.access`); `AccessAuditor.round` turns the new lines into
events about once a second (`Auditor.run_forever`) and moves its cursor (E:/audit/access.json) only after they are
on E:. One event per user, address, study and kind per hour: a page that refreshes itself every ten seconds and a
viewer that asks for every frame do not flood the trail, and the hour is in the event's key, so that reading the
same lines twice (after a crash) writes nothing new.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.audit import write_json
from gateway.core import audit as A

if TYPE_CHECKING:
    from gateway.auditing import Auditor

ACCESS_BATCH_BYTES = 4 << 20  # access lines turned into audit events per round


class AccessAuditor:
    """Reads the access lines after its cursor and writes their events through the gateway's `Auditor`."""

    def __init__(self, auditor: Auditor) -> None:
        self.auditor = auditor
        # a study's (study, SOP class, path) rows, for its patient (the catalog's `study_audit_rows`)
        self.rows_of_study: Callable[[str], Awaitable[list[tuple[str, str, str]]]] | None = None

    async def round(self, folder: Path) -> int:
        """Turn the web port's new access lines (`gateway.access`: DICOMweb, WADO, the viewer, the status page and
        its thumbnails) into audit events (`events_of`). The cursor (E:/audit/access.json) moves only after the
        events are on E:; a crash between the two reads the lines again, which writes nothing new."""
        cursor_file = self.auditor.trail.folder / "access.json"
        try:
            cur = json.loads(cursor_file.read_text())
            day, offset = str(cur["day"]), int(cur["offset"])
        except (OSError, ValueError, KeyError):
            day, offset = "", 0
        days = sorted(p.stem for p in folder.glob("????-??-??.jsonl")) if folder.exists() else []
        written = 0
        for d in days:
            if d < day:
                continue
            start = offset if d == day else 0
            path = folder / f"{d}.jsonl"
            with path.open("rb") as f:
                f.seek(start)
                chunk = f.read(ACCESS_BATCH_BYTES)
            end = chunk.rfind(b"\n") + 1
            if end:
                written += await self.events_of(d, start, chunk[:end])
            write_json(cursor_file, {"day": d, "offset": start + end})
            if end < len(chunk) or len(chunk) == ACCESS_BATCH_BYTES:
                break  # a line being written, or more than a batch: the rest in the next round
        return written

    async def events_of(self, day: str, start: int, data: bytes) -> int:
        """The audit events of one batch of access lines: the first access per hour by one user from one address
        to one study (per kind: view, retrieve, metadata, store), and the first time per hour a query is made; the
        events' keys name the hour, so repeats within it (a page that refreshes itself, the viewer's frame
        requests) are not written again, and reading the same lines twice after a crash writes nothing new."""
        groups: dict[tuple[str, str, str, str, int], tuple[float, int]] = {}  # → (at, instances)
        queries: dict[tuple[str, str, str, int], tuple[float, dict[str, str]]] = {}
        for line in data.splitlines():
            try:
                e = json.loads(line)
                kind, user, remote = str(e["kind"]), str(e["user"]), str(e["remote"])
                at, studies, n = float(e["at"]), [str(s) for s in e["studies"]], int(e.get("instances", 0))
            except (ValueError, KeyError, TypeError):
                continue
            hour = int(at // 3600)
            if kind == "query":
                q = {str(k): str(v) for k, v in dict(e.get("query") or {}).items()}
                queries.setdefault((user, remote, json.dumps(q, sort_keys=True), hour), (at, q))
                continue
            for study in studies:
                when, count = groups.get((kind, user, remote, study, hour), (at, 0))
                groups[(kind, user, remote, study, hour)] = (when, count + max(1, n // max(1, len(studies))))
        events = []
        for (user, remote, text, hour), (at, q) in queries.items():
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]
            events.append(
                A.AuditEvent(
                    key=f"access:query:{user}:{remote}:{digest}:{hour}",
                    event=A.QUERY,
                    action="E",
                    at=at,
                    participants=(A.Participant(user, True, remote), self.auditor.me),
                    source=self.auditor.settings.name,
                    query="&".join(f"{k}={v}" for k, v in sorted(q.items()))[:4000],
                )
            )
        keys = {f"access:{k}:{u}:{r}:{s}:{h}": (k, u, r, s, h) for (k, u, r, s, h) in groups}
        seen = await asyncio.to_thread(self.auditor.trail.recorded, keys) if keys else set()
        for key, (kind, user, remote, study, hour) in keys.items():
            if key in seen:
                continue
            at, count = groups[(kind, user, remote, study, hour)]
            rows = await self.rows_of_study(study) if self.rows_of_study is not None else []
            info = (await self.auditor.studies(rows)).get(study) if rows else None
            (pid, name), classes = info if info else (("", ""), ())
            events.append(
                A.AuditEvent(
                    key=key,
                    event=A.INSTANCES_TRANSFERRED if kind == "store" else A.INSTANCES_ACCESSED,
                    action="C" if kind == "store" else "R",
                    at=at,
                    participants=(A.Participant(user, True, remote), self.auditor.me),
                    patient_id=pid,
                    patient_name=name,
                    studies=(A.Study(study, classes, f"{kind} over the web port (first of the hour)"),),
                    source=self.auditor.settings.name,
                )
            )
        return await asyncio.to_thread(self.auditor.trail.record, events) if events else 0
