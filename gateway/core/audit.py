"""Audit messages: DICOM PS3.15 Annex A.5 (the schema IHE ATNA uses) and their RFC 5424 syslog form.

Pure: an `AuditEvent` (what happened, who took part, which patient and study) becomes one line of XML
(`to_xml`); `check` tells whether a message has what the schema requires (the schema's RELAX NG is not shipped
with any Python library: `check` tests the same structure element by element, and the tests run it on every
message the pipeline produced); `syslog_frame` wraps a message as RFC 5424 over RFC 5425 framing (facility 10
authpriv, severity 5 notice, MSGID `DICOM+RFC3881`, as IHE ITI-20 asks).

The audit trail is the one place where patient names and IDs may be written (ATNA requires them): messages go
only to the audit repository and the local hash-chained copy (`gateway.audit`), never to logs or metrics.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

# (code, meaning) of DICOM's audit vocabulary (PS3.16 CID 400-405, DCM coding scheme)
APPLICATION_ACTIVITY = ("110100", "Application Activity")
APPLICATION_START = ("110120", "Application Start")
APPLICATION_STOP = ("110121", "Application Stop")
BEGIN_TRANSFERRING = ("110102", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")
STUDY_DELETED = ("110105", "DICOM Study Deleted")
EXPORT = ("110106", "Export")
IMPORT = ("110107", "Import")
NETWORK_ENTRY = ("110108", "Network Entry")
QUERY = ("110112", "Query")
SECURITY_ALERT = ("110113", "Security Alert")
USER_AUTHENTICATION = ("110114", "User Authentication")
LOGIN = ("110122", "Login")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = ("110131", "Software Configuration")
RESTRICTED_FUNCTION = ("110132", "Use of Restricted Function")
ATTACH = ("110124", "Attach")

ROLE_SOURCE = ("110153", "Source Role ID")
ROLE_DESTINATION = ("110152", "Destination Role ID")
ROLE_APPLICATION = ("110150", "Application")
ROLE_LAUNCHER = ("110151", "Application Launcher")

OUTCOMES = {"success": "0", "minor": "4", "serious": "8", "major": "12"}
ACTIONS = ("C", "R", "U", "D", "E")


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user, a process or a node."""

    user_id: str
    requestor: bool
    address: str = ""  # NetworkAccessPointID (an IP address or host name)
    role: tuple[str, str] | None = None
    name: str = ""  # AlternativeUserID (e.g. an AE title)


@dataclass(frozen=True)
class Study:
    """The study a transfer or access is about, with the SOP classes and instance counts it touched."""

    uid: str
    classes: tuple[tuple[str, int], ...] = ()  # (SOP Class UID, number of instances)
    description: str = ""  # e.g. the partner or the transfer


@dataclass(frozen=True)
class AuditEvent:
    """One audit event (see the module docstring). `key` identifies it for de-duplication across crashes."""

    key: str
    event: tuple[str, str]
    action: str  # C R U D E
    at: float
    outcome: str = "success"
    outcome_text: str = ""
    types: tuple[tuple[str, str], ...] = ()
    participants: tuple[Participant, ...] = ()
    patient_id: str = ""
    patient_name: str = ""
    studies: tuple[Study, ...] = ()
    source: str = ""  # AuditSourceID: this gateway
    extra: dict[str, str] = field(
        default_factory=dict
    )  # other participant objects: name → text (e.g. a mail)
    query: str = ""  # a Query event's query (a DICOMweb search's parameters): ParticipantObjectQuery


def _code(parent: ET.Element, tag: str, code: tuple[str, str], scheme: str = "DCM") -> ET.Element:
    if scheme == "DCM" and not code[0].isdigit():
        scheme = GATEWAY_CODES  # DCM's codes are numbers; ours are words
    return ET.SubElement(
        parent, tag, {"csd-code": code[0], "codeSystemName": scheme, "originalText": code[1]}
    )


def _participants(root: ET.Element, e: AuditEvent) -> None:
    for p in e.participants:
        attrs = {"UserID": p.user_id, "UserIsRequestor": "true" if p.requestor else "false"}
        if p.name:
            attrs["AlternativeUserID"] = p.name
        if p.address:
            attrs["NetworkAccessPointID"] = p.address
            attrs["NetworkAccessPointTypeCode"] = "2" if p.address[:1].isdigit() or ":" in p.address else "1"
        ap = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role:
            _code(ap, "RoleIDCode", p.role)


def _objects(root: ET.Element, e: AuditEvent) -> None:
    """The participant objects. Each has a name (or a query), as the schema of PS3.15 A.5.1 wants (its older
    editions without the `?`): the patient's name, a study's description (what happened to it), an object's
    label; ParticipantObjectDescription holds only the SOP classes and counts (element content)."""
    if e.patient_id:
        po = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": e.patient_id,
                "ParticipantObjectTypeCode": "1",
                "ParticipantObjectTypeCodeRole": "1",
            },
        )
        _code(po, "ParticipantObjectIDTypeCode", ("2", "Patient Number"), "RFC-3881")
        ET.SubElement(po, "ParticipantObjectName").text = e.patient_name
    for s in e.studies:
        po = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": s.uid,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _code(po, "ParticipantObjectIDTypeCode", ("110180", "Study Instance UID"))
        ET.SubElement(po, "ParticipantObjectName").text = s.description or "study"
        if s.classes:
            desc = ET.SubElement(po, "ParticipantObjectDescription")
            for uid, count in s.classes:
                ET.SubElement(desc, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
    if e.query:
        po = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": "QIDO-RS",
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "24",
            },
        )
        _code(po, "ParticipantObjectIDTypeCode", ("QIDO-RS", "DICOMweb search"))
        ET.SubElement(po, "ParticipantObjectQuery").text = base64.b64encode(e.query.encode()).decode()
    for name, text in e.extra.items():
        po = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": text,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "4",
            },
        )
        _code(po, "ParticipantObjectIDTypeCode", ("12", "URI"), "RFC-3881")
        ET.SubElement(po, "ParticipantObjectName").text = name


def to_xml(e: AuditEvent) -> str:
    """The event as a DICOM audit message (one line of XML, UTF-8 text)."""
    if e.action not in ACTIONS:
        raise ValueError(f"EventActionCode {e.action!r}")
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": e.action,
            "EventDateTime": dt.datetime.fromtimestamp(e.at, dt.UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": OUTCOMES[e.outcome],
        },
    )
    _code(ident, "EventID", e.event)
    for t in e.types:
        _code(ident, "EventTypeCode", t)
    if e.outcome_text:
        ET.SubElement(ident, "EventOutcomeDescription").text = e.outcome_text
    _participants(root, e)
    source = ET.SubElement(
        root, "AuditSourceIdentification", {"AuditSourceID": e.source or "dicom-mail-gateway"}
    )
    ET.SubElement(
        source,
        "AuditSourceTypeCode",
        {"csd-code": "4", "codeSystemName": "DCM", "originalText": "Application Server Process"},
    )
    _objects(root, e)
    return ET.tostring(root, encoding="unicode")


def check(xml: str) -> list[str]:
    """What a message lacks against the DICOM audit message schema (PS3.15 A.5.1): [] when it is complete."""
    problems = []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return [f"not XML: {exc}"]
    if root.tag != "AuditMessage":
        problems.append("root is not AuditMessage")
    ident = root.find("EventIdentification")
    if ident is None:
        return [*problems, "no EventIdentification"]
    for attr in ("EventActionCode", "EventDateTime", "EventOutcomeIndicator"):
        if not ident.get(attr):
            problems.append(f"EventIdentification@{attr} missing")
    if ident.get("EventActionCode") not in ACTIONS:
        problems.append("EventActionCode not one of C R U D E")
    if ident.get("EventOutcomeIndicator") not in OUTCOMES.values():
        problems.append("EventOutcomeIndicator not 0, 4, 8 or 12")
    try:
        dt.datetime.fromisoformat(ident.get("EventDateTime", ""))
    except ValueError:
        problems.append("EventDateTime is not an xs:dateTime")
    codes = [c for c in root.iter() if "csd-code" in c.attrib]
    if ident.find("EventID") is None:
        problems.append("no EventID")
    for c in codes:
        if not c.get("codeSystemName") or not c.get("originalText"):
            problems.append(f"{c.tag}: a coded value needs codeSystemName and originalText")
    participants = root.findall("ActiveParticipant")
    if not participants:
        problems.append("no ActiveParticipant")
    for p in participants:
        if not p.get("UserID") or p.get("UserIsRequestor") not in ("true", "false"):
            problems.append("ActiveParticipant needs UserID and UserIsRequestor")
    src = root.find("AuditSourceIdentification")
    if src is None or not src.get("AuditSourceID"):
        problems.append("no AuditSourceIdentification@AuditSourceID")
    for p in participants:
        if [c.tag for c in p if c.tag not in ("RoleIDCode", "MediaIdentifier")]:
            problems.append("ActiveParticipant holds only RoleIDCode and MediaIdentifier")
        if p.get("NetworkAccessPointTypeCode", "1") not in ("1", "2", "3", "4", "5"):
            problems.append("NetworkAccessPointTypeCode not 1 to 5")
    problems += _check_identification(ident)
    for po in root.findall("ParticipantObjectIdentification"):
        problems += _check_object(po)
    order = [c.tag for c in root]
    expected = [
        "EventIdentification",
        "ActiveParticipant",
        "AuditSourceIdentification",
        "ParticipantObjectIdentification",
    ]
    ranks = [expected.index(t) if t in expected else -1 for t in order]
    if -1 in ranks or ranks != sorted(ranks):
        problems.append(f"elements out of the schema's order: {order}")
    return problems


def _check_identification(ident: ET.Element) -> list[str]:
    """EventIdentification's children in the schema's order: EventID, EventTypeCode*, EventOutcomeDescription?"""
    tags = [c.tag for c in ident]
    allowed = ["EventID", "EventTypeCode", "EventOutcomeDescription"]
    ranks = [allowed.index(t) if t in allowed else -1 for t in tags]
    if -1 in ranks or ranks != sorted(ranks) or tags.count("EventID") != 1 or tags.count(allowed[2]) > 1:
        return [f"EventIdentification holds {tags}"]
    return []


def _check_object(po: ET.Element) -> list[str]:
    """One ParticipantObjectIdentification against PS3.15 A.5.1: ParticipantObjectIDTypeCode, a name or a query,
    ParticipantObjectDetail*, ParticipantObjectDescription* (elements only: SOPClass and the like); its ID and the
    enumerated attributes."""
    problems = []
    tags = [c.tag for c in po]
    if not po.get("ParticipantObjectID"):
        problems.append("ParticipantObjectIdentification needs a ParticipantObjectID")
    if tags[:1] != ["ParticipantObjectIDTypeCode"]:
        problems.append("ParticipantObjectIdentification starts with its ParticipantObjectIDTypeCode")
    if tags[1:2] not in (["ParticipantObjectName"], ["ParticipantObjectQuery"]):
        problems.append(
            "ParticipantObjectIdentification needs a ParticipantObjectName or ParticipantObjectQuery"
        )
    after = ["ParticipantObjectDetail", "ParticipantObjectDescription"]
    ranks = [after.index(t) if t in after else -1 for t in tags[2:]]
    if -1 in ranks or ranks != sorted(ranks):
        problems.append(f"ParticipantObjectIdentification holds {tags}")
    for desc in po.findall("ParticipantObjectDescription"):
        known = ("MPPS", "Accession", "SOPClass", "ParticipantObjectContainsStudy", "Encrypted", "Anonymized")
        if (desc.text or "").strip() or any(c.tag not in known for c in desc):
            problems.append("ParticipantObjectDescription holds only elements (SOPClass, Accession, …)")
        for c in desc.iter("SOPClass"):
            if not (c.get("NumberOfInstances") or "").isdigit():
                problems.append("SOPClass needs NumberOfInstances, an integer")
    query = po.find("ParticipantObjectQuery")
    if query is not None:
        try:
            base64.b64decode(query.text or "", validate=True)
        except (binascii.Error, ValueError):
            problems.append("ParticipantObjectQuery is not base64")
    if po.get("ParticipantObjectTypeCode", "1") not in ("1", "2", "3", "4"):
        problems.append("ParticipantObjectTypeCode not 1 to 4")
    if po.get("ParticipantObjectTypeCodeRole", "1") not in {str(n) for n in range(1, 27)}:
        problems.append("ParticipantObjectTypeCodeRole not 1 to 26")
    return problems


def syslog_frame(
    xml: str, at: float, host: str, app: str, seq: int, resent: bool = False, replay: bool = False
) -> bytes:
    """One RFC 5424 message carrying `xml`, framed for RFC 5425 (`LENGTH SP MESSAGE`). Structured data names the
    record's place in the local chain; `resent` marks a record that may have reached the repository already (the
    same `seq` again), `replay` an event written again after a crash (it may repeat an earlier record's event)."""
    stamp = dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    mark = (' resent="1"' if resent else "") + (' replay="1"' if replay else "")
    sd = f'[dmg@32473 seq="{seq}"{mark}]'
    message = (
        f"<85>1 {stamp} {host or '-'} {app[:48] or '-'} - DICOM+RFC3881 {sd} ".encode()
        + b"\xef\xbb\xbf"
        + xml.encode()
    )
    return str(len(message)).encode() + b" " + message


# a gateway's own codes (PS3.15 A.5.1 allows a private coding scheme) where DICOM's vocabulary has none
GATEWAY_CODES = "99DMG"
ASSOCIATION_ACCEPTED = ("ASSOCIATION-ACCEPTED", "Association Accepted")
ASSOCIATION_REFUSED = ("ASSOCIATION-REFUSED", "Association Refused")
RECEIPT = ("RECEIPT", "Receipt")
BACKUP = ("BACKUP", "Backup")
RESTORE = ("RESTORE", "Restore")
SUPPRESSED = ("SUPPRESSED", "Events Not Recorded Singly")


class Budget:
    """How many single audit events a sender nobody has authenticated (a network address calling our DICOM port,
    the From of a mail whose signature failed) may cause per UTC day, and in all: beyond that, events are counted
    and written as one summary (`take_suppressed`), so that a flood costs E: a bounded number of bytes a day.

    Pure: the caller gives the day."""

    def __init__(self, per_sender: int, per_day: int) -> None:
        self.per_sender = per_sender
        self.per_day = per_day
        self._day = ""
        self._counts: dict[str, int] = {}
        self._total = 0
        self._suppressed: dict[str, int] = {}

    def admit(self, sender: str, day: str) -> bool:
        """True: record this event singly; False: it was counted for the day's summary instead."""
        if day != self._day:
            self._day, self._counts, self._total = day, {}, 0
        n = self._counts.get(sender, 0)
        if n >= self.per_sender or self._total >= self.per_day:
            if sender in self._suppressed or len(self._suppressed) < 1000:
                self._suppressed[sender] = self._suppressed.get(sender, 0) + 1
            else:
                self._suppressed["(other senders)"] = self._suppressed.get("(other senders)", 0) + 1
            return False
        self._counts[sender] = n + 1
        self._total += 1
        return True

    def take_suppressed(self) -> dict[str, int]:
        """The events counted instead of recorded since the last call: sender → how many."""
        out, self._suppressed = self._suppressed, {}
        return out


def configuration_changes(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> list[str]:
    """What changed between two configuration summaries ({"partner X": {"address": …, "key": …}, "pacs Y": …}),
    in words, one line per change: added, removed, and each changed field. Pure."""
    out = []
    for name in sorted(after.keys() - before.keys()):
        out.append(f"{name} added")
    for name in sorted(before.keys() - after.keys()):
        out.append(f"{name} removed")
    for name in sorted(before.keys() & after.keys()):
        for field_name in sorted(before[name].keys() | after[name].keys()):
            old, new = before[name].get(field_name, ""), after[name].get(field_name, "")
            if old != new:
                out.append(f"{name}: {field_name} changed ({old or '-'} → {new or '-'})")
    return out
