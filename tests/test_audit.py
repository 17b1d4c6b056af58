"""The audit trail (fast tier): DICOM audit messages that pass the schema check, the hash chain that catches a
changed, removed or inserted record, de-duplication across a crash, who may read the files, and the history a
data protection officer asks for."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from gateway.audit import AuditTrail
from gateway.auditread import backlog, history
from gateway.core import audit as A

STUDY = "1.2.826.0.1.3680043.8.498.1"


def transfer(key: str, at: float, pid: str = "PID-1", partner: str = "gateway-b") -> A.AuditEvent:
    return A.AuditEvent(
        key=key,
        event=A.INSTANCES_TRANSFERRED,
        action="R",
        at=at,
        participants=(
            A.Participant("gateway-a", True, "", A.ROLE_SOURCE, "GATEWAY_A"),
            A.Participant(partner, False, "", A.ROLE_DESTINATION),
        ),
        patient_id=pid,
        patient_name="DOE^JANE",
        studies=(A.Study(STUDY, (("1.2.840.10008.5.1.4.1.1.2", 3),), "sent by mail"),),
        source="gateway-a",
    )


def test_messages_have_what_the_schema_requires() -> None:
    start = A.AuditEvent(
        "s",
        A.APPLICATION_ACTIVITY,
        "E",
        1.7e9,
        types=(A.APPLICATION_START,),
        participants=(A.Participant("gw", False),),
    )
    for e in (transfer("t", 1.7e9), start):
        xml = A.to_xml(e)
        assert A.check(xml) == [], A.check(xml)
        assert "\n" not in xml, "one line: one syslog message, one line of the local copy"
    query = A.AuditEvent(
        "q", A.QUERY, "E", 1.7e9, participants=(A.Participant("operator", True, "10.0.0.1"),), query="a=<b>&c"
    )
    assert A.check(A.to_xml(query)) == []
    assert "no ActiveParticipant" in A.check(A.to_xml(A.AuditEvent("x", A.EXPORT, "R", 1.7e9)))
    # what PS3.15 A.5.1's schema refuses, the check refuses too
    good = A.to_xml(transfer("t", 1.7e9))
    texty = good.replace("<ParticipantObjectDescription>", "<ParticipantObjectDescription>sent by mail")
    assert "ParticipantObjectDescription holds only elements (SOPClass, Accession, …)" in A.check(texty)
    nameless = re.sub(r"<ParticipantObjectName>[^<]*</ParticipantObjectName>", "", good, count=1)
    assert any("ParticipantObjectName or ParticipantObjectQuery" in p for p in A.check(nameless))
    assert "ParticipantObjectTypeCodeRole not 1 to 26" in A.check(
        good.replace('ParticipantObjectTypeCodeRole="3"', 'ParticipantObjectTypeCodeRole="99"')
    )
    assert any("EventIdentification holds" in p for p in A.check(good.replace("<EventID ", "<Event ")))
    assert A.check("<AuditMessage/>") == ["no EventIdentification"]
    frame = A.syslog_frame(A.to_xml(start), 1.7e9, "host", "dicom-mail-gateway", 7, resent=True)
    length, message = frame.split(b" ", 1)
    assert int(length) == len(message) and message.startswith(b"<85>1 2023-11-14T22:13:20.000Z host ")
    assert b' DICOM+RFC3881 [dmg@32473 seq="7" resent="1"] \xef\xbb\xbf<AuditMessage>' in message


def test_the_chain_catches_a_changed_a_removed_and_an_inserted_record(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit", "gateway-a")
    assert trail.record([transfer(f"t{n}", 1.7e9 + n) for n in range(5)]) == 5
    assert trail.record([transfer("t2", 1.7e9)]) == 0, "a key already written is not written twice"
    (day,) = trail.days()
    assert trail.verify(day) == (True, f"{day}: chain intact")
    path = tmp_path / "audit" / f"{day}.jsonl"
    assert (
        stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    )
    good = path.read_text().splitlines()

    def broken(lines: list[str]) -> str:
        path.write_text("\n".join(lines) + "\n")
        ok, said = trail.verify(day)
        assert not ok
        return said

    changed = json.loads(good[2])
    changed["xml"] = changed["xml"].replace("PID-1", "PID-2")
    assert "line 3 (seq 3): its content does not match its hash (changed)" in broken(
        [*good[:2], json.dumps(changed), *good[3:]]
    )
    assert "line 3 (seq 4): does not follow" in broken([*good[:2], *good[3:]])
    assert "line 3 (seq 2): does not follow" in broken([*good[:2], good[1], *good[2:]])
    path.write_text("\n".join(good) + "\n")
    assert trail.verify(day)[0]


def test_the_history_of_a_patient_a_study_and_a_partner(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "audit", "gateway-a")
    trail.record([transfer("a", 1.7e9), transfer("b", 1.7e9 + 60, pid="PID-9", partner="gateway-c")])
    lines = history(trail, patient="PID-1")
    assert len(lines) == 1 and "DICOM Instances Transferred [R] success" in lines[0]
    assert "destination: gateway-b" in lines[0] and f"study {STUDY} (3 instances)" in lines[0]
    assert "patient PID-1 DOE^JANE" in lines[0]
    assert len(history(trail, study=STUDY)) == 2 and len(history(trail, partner="gateway-c")) == 1
    assert history(trail, patient="PID-1", since=1.7e9 + 1) == []
    # two gateways on one machine: one history, by time, each line naming its gateway
    other = AuditTrail(tmp_path / "other", "gateway-b")
    other.record([transfer("in", 1.7e9 + 30)])
    merged = history([trail, other], study=STUDY)
    assert [line.split("]", 1)[0] for line in merged] == ["[gateway-a", "[gateway-b", "[gateway-a"]


def test_two_writers_keep_one_chain(tmp_path: Path) -> None:
    """The gateway and an operator's command append to the same day file: each sees the other's records."""
    gateway, command = AuditTrail(tmp_path / "audit", "gw"), AuditTrail(tmp_path / "audit", "gw")
    gateway.record([transfer("g1", 1.7e9)])
    command.record([transfer("c1", 1.7e9)])
    gateway.record([transfer("g2", 1.7e9)])
    (day,) = gateway.days()
    assert gateway.verify(day)[0] and [r.seq for r in gateway.records(day)] == [1, 2, 3]


def test_pending_records_follow_the_cursor_forward_and_back(tmp_path: Path) -> None:
    """What the repository forwarder reads: the records after its cursor, from where the last batch ended, and
    again from an earlier cursor after a lost connection."""
    trail = AuditTrail(tmp_path / "audit", "gw")
    trail.record([transfer(f"a{n}", 1.7e9 + n) for n in range(3)])
    (day,) = trail.days()
    first = list(trail.pending((day, 0)))
    assert [c for c, _ in first] == [(day, 1), (day, 2), (day, 3)]
    trail.record([transfer(f"b{n}", 1.7e9 + n) for n in range(2)])
    assert [r.seq for _, r in trail.pending((day, 3))] == [4, 5]
    assert [r.seq for _, r in trail.pending((day, 5))] == []
    assert [r.seq for _, r in trail.pending((day, 1))] == [2, 3, 4, 5], "back to an earlier cursor"
    assert [r.seq for _, r in trail.pending(("", 0))] == [1, 2, 3, 4, 5]


def test_the_backlog_monitoring_sees(tmp_path: Path) -> None:
    """check_mk's view of the way to the repository: what waits after the forwarder's cursor, and since when."""
    trail = AuditTrail(tmp_path / "audit", "gw")
    assert backlog(trail.folder) == (0, None)
    trail.record([transfer(f"a{n}", 1.7e9 + n) for n in range(3)])
    (day,) = trail.days()
    assert backlog(trail.folder) == (3, 1.7e9)
    (trail.folder / "sent.json").write_text(json.dumps({"day": day, "line": 2}))
    assert backlog(trail.folder) == (1, 1.7e9 + 2)
    (trail.folder / "sent.json").write_text(json.dumps({"day": day, "line": 3}))
    assert backlog(trail.folder) == (0, None)
