"""Reading the audit trail (`gateway.audit`): the data protection officer's history of a patient, a study or a
partner (`audit --patient/--study/--partner`), and the backlog for the repository that check_mk watches."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from gateway.audit import AuditTrail, parse_record


def backlog(folder: Path) -> tuple[int, float | None]:
    """(records the repository has not got yet, when the oldest of them was written) from the day files and the
    forwarder's cursor (`sent.json`); for monitoring, which runs apart from the gateway. Counts lines only."""
    try:
        d = json.loads((folder / "sent.json").read_text())
        day0, n0 = str(d["day"]), int(d["line"])
    except (OSError, ValueError, KeyError):
        day0, n0 = "", 0
    waiting, oldest = 0, None
    for path in sorted(folder.glob("????-??-??.jsonl")):
        if path.stem < day0:
            continue
        data = path.read_bytes()
        skip = n0 if path.stem == day0 else 0
        lines = data.count(b"\n")
        if lines > skip:
            if oldest is None:
                start = 0
                for _ in range(skip):
                    start = data.index(b"\n", start) + 1
                oldest = parse_record(data[start : data.index(b"\n", start)].decode("utf-8")).at
            waiting += lines - skip
    return waiting, oldest


def _describe(root: Any, at: float, studies: list[str], pids: list[str]) -> str:
    """One history line for one audit message."""
    objects = root.findall("ParticipantObjectIdentification")
    people = root.findall("ActiveParticipant")
    ident = root.find("EventIdentification")
    assert ident is not None
    event = ident.find("EventID")
    types = [t.get("originalText", "") for t in ident.findall("EventTypeCode")]
    what = (event.get("originalText", "") if event is not None else "?") + (
        f" ({', '.join(types)})" if types else ""
    )
    outcome = {"0": "success", "4": "failure", "8": "serious failure", "12": "major failure"}.get(
        ident.get("EventOutcomeIndicator", ""), "?"
    )
    roles = []
    for p in people:
        role = p.find("RoleIDCode")
        label = role.get("originalText", "").replace(" Role ID", "") if role is not None else ""
        where = f"@{p.get('NetworkAccessPointID')}" if p.get("NetworkAccessPointID") else ""
        roles.append(f"{label.lower() or 'by'}: {p.get('UserID')}{where}")
    names = [
        n.text or ""
        for o in objects
        for n in o.findall("ParticipantObjectName")
        if o.get("ParticipantObjectTypeCode") == "1"
    ]
    counts = sum(int(c.get("NumberOfInstances", "0")) for o in objects for c in o.iter("SOPClass"))
    stamp = dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")
    line = f"{stamp}  {what} [{ident.get('EventActionCode')}] {outcome}; {'; '.join(roles)}"
    if studies:
        line += f"; study {', '.join(studies)} ({counts} instances)"
    if pids:
        line += f"; patient {', '.join(pids)}" + (f" {names[0]}" if names else "")
    return line


def history(
    trail: AuditTrail | list[AuditTrail],
    *,
    patient: str | None = None,
    study: str | None = None,
    partner: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> list[str]:
    """`audit --patient/--study/--partner`: the matching events of the local copy, oldest first, one line each
    (time, what, outcome, who took part, the study and the patient). For the data protection officer: this output
    names patients. Several trails (gateways on this machine): their events merged by time, each line naming
    the gateway it comes from."""
    from xml.etree import ElementTree as ET

    trails = trail if isinstance(trail, list) else [trail]
    out: list[tuple[float, str]] = []
    for t, day in ((tr, d) for tr in trails for d in tr.days()):
        for r in t.records(day):
            if (since is not None and r.at < since) or (until is not None and r.at > until):
                continue
            root = ET.fromstring(r.xml)
            objects = root.findall("ParticipantObjectIdentification")
            pids = [
                o.get("ParticipantObjectID", "") for o in objects if o.get("ParticipantObjectTypeCode") == "1"
            ]
            studies = [
                o.get("ParticipantObjectID", "")
                for o in objects
                if o.get("ParticipantObjectTypeCodeRole") == "3"
            ]
            people = root.findall("ActiveParticipant")
            users = [p.get("UserID", "") for p in people]
            if patient is not None and patient not in pids:
                continue
            if study is not None and study not in studies:
                continue
            if partner is not None and partner not in users:
                continue
            line = _describe(root, r.at, studies, pids)
            if len(trails) > 1:
                line = f"[{t.source}] {line}"
            out.append(
                (r.at, line + (" [replayed after a crash: may repeat an earlier line]" if r.replay else ""))
            )
    return [line for _, line in sorted(out, key=lambda item: item[0])]
