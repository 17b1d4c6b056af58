"""Receipts: RFC 3798 Message Disposition Notifications, built and read. Pure.

The dispositions the @GIT recommendation uses, by outcome of an inbound mail:

    OK       automatic-action/MDN-sent-automatically; displayed
    WARNING  automatic-action/MDN-sent-automatically; displayed/warning   (stored, but e.g. a PACS refused some)
    ERROR    automatic-action/MDN-sent-automatically; deleted/error       (not stored; a resend may work)
    FAILED   automatic-action/MDN-sent-automatically; deleted             (not stored; refused for good)

An MDN is `multipart/report; report-type=disposition-notification` with a human-readable part and the
`message/disposition-notification` part; it carries no patient data (ids and reasons only). Signing and, for
PGP partners, encryption are added around it by the caller, like any outbound mail.

Proof of content (the README's "Receipts that prove content" documents it for other implementations): like an
AS2 receipt (RFC 4130 §7.4.3), the notification names the digest of the signed content it received,
`Received-Content-MIC: <base64 SHA-256>, sha-256`, and a third part, `application/json` named
`stored-instances.json`, lists every instance the mail carried with the SHA-256 of the file as stored when the
receipt was built and what the receiver's PACS did with it (`PACS_STATES`). Partners that send plain RFC 3798
MDNs still count; their receipts are "not verified".
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from email.utils import formatdate

from gateway.core.mime import (
    CRLF,
    MailFormatError,
    crlf_only,
    header,
    header_lines,
    message_id_or_empty,
    parse_head,
)
from gateway.core.states import RECEIPT_OUTCOMES

MODE = "automatic-action/MDN-sent-automatically"
OUTCOMES = RECEIPT_OUTCOMES  # the state table's receipt outcomes (core.states), in this order:
OK, WARNING, ERROR, FAILED = OUTCOMES
# What a receiver's PACS did with an instance, best first; a receipt names the worst over all its PACS
PACS_STATES = ("committed", "stored", "none", "pending", "not-committed", "refused")
STORED_PART = "stored-instances.json"
MAX_STORED_PART = 16 * 1024 * 1024  # a partner's instance list is read up to this size (≈100 000 instances)
_UID_RE = re.compile(r"^[0-9][0-9.]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MIC_RE = re.compile(r"^\s*([A-Za-z0-9+/=]{4,128})\s*,\s*([\w-]+)\s*$")
_DISPOSITION_RE = re.compile(r"^\s*([\w/-]+)\s*/\s*([\w-]+)\s*;\s*([\w-]+)(?:\s*/\s*([\w-]+))?", re.ASCII)


@dataclass(frozen=True)
class Stored:
    """One instance as the receiver reports it: the SHA-256 of its stored file (None: not on its disk) and what
    its PACS did (one of `PACS_STATES`, with the PACS's reason where it did not commit or store)."""

    uid: str
    sha256: str | None
    pacs: str = "none"
    reason: str = ""


@dataclass(frozen=True)
class Receipt:
    """What a partner's MDN says about one of our mails. `mic` and `stored` are None in a plain RFC 3798 MDN;
    `unreadable` says why a list that was there could not be read."""

    original_message_id: str
    outcome: str  # one of OUTCOMES
    detail: str
    mic: str | None = None  # base64 SHA-256 of the signed content as the partner received it
    stored: tuple[Stored, ...] | None = None
    unreadable: str = ""


def content_mic(content: bytes) -> str:
    """The Received-Content-MIC of a signed entity: base64 of the SHA-256 of its canonical (CRLF) form, as AS2
    computes it. Both sides compute it on the entity the signature covers."""
    if not crlf_only(content):
        content = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return base64.b64encode(hashlib.sha256(content).digest()).decode("ascii")


def stored_json(stored: list[Stored]) -> bytes:
    """The `stored-instances.json` part's body: one instance per line (mail lines stay far below 998 bytes)."""
    items = []
    for s in stored:
        item: dict[str, str | None] = {"uid": s.uid, "sha256": s.sha256, "pacs": s.pacs}
        if s.reason:
            item["reason"] = s.reason[:200]
        items.append(json.dumps(item, separators=(",", ":"), ensure_ascii=True))
    lines = ['{"version":1,"instances":[', ",\r\n".join(items), "]}"]
    return "\r\n".join(lines).encode("ascii")


def read_stored(body: bytes) -> tuple[Stored, ...]:
    """A partner's instance list, checked field by field (`ValueError` with the first problem)."""
    if len(body) > MAX_STORED_PART:
        raise ValueError(f"instance list of {len(body)} bytes")
    doc = json.loads(body)
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("instances"), list):
        raise ValueError("not a version 1 instance list")
    out = []
    for item in doc["instances"]:
        if not isinstance(item, dict):
            raise ValueError("an instance entry is not an object")
        uid, sha, pacs, reason = (
            item.get("uid"),
            item.get("sha256"),
            item.get("pacs", "none"),
            item.get("reason", ""),
        )
        if not isinstance(uid, str) or not _UID_RE.match(uid):
            raise ValueError("an instance entry without a valid uid")
        if sha is not None and (not isinstance(sha, str) or not _SHA_RE.match(sha)):
            raise ValueError(f"instance {uid}: sha256 is not 64 lower-case hex digits")
        if pacs not in PACS_STATES:
            raise ValueError(f"instance {uid}: unknown PACS state")
        text = "".join(c for c in str(reason) if c.isprintable())[:200]
        out.append(Stored(uid, sha, str(pacs), text))
    return tuple(out)


def build_report(
    *,
    sender: str,
    original_message_id: str,
    outcome: str,
    detail: str,
    reporting_ua: str = "dicom-mail-gateway",
    mic: str | None = None,
    stored: list[Stored] | None = None,
) -> bytes:
    """The MDN as a MIME entity with its own Content-Type (sign/encrypt it, then add the outer headers); with
    `mic` and `stored`, the proof of content (module docstring)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown disposition {outcome!r}")
    detail = " ".join(detail.split())[:900]
    boundary = "mdn-" + secrets.token_hex(12)
    human = {
        OK: "The DICOM e-mail was received, verified and stored.",
        WARNING: "The DICOM e-mail was received and stored, with a warning.",
        ERROR: "The DICOM e-mail could not be processed; please send it again.",
        FAILED: "The DICOM e-mail was refused and will not be processed.",
    }[outcome]
    fields = [
        ("Reporting-UA", reporting_ua),
        ("Original-Recipient", f"rfc822;{sender}"),
        ("Final-Recipient", f"rfc822;{sender}"),
        ("Original-Message-ID", original_message_id),
        ("Disposition", f"{MODE}; {outcome}"),
    ]
    if mic:
        fields.append(("Received-Content-MIC", f"{mic}, sha-256"))
    if detail:
        fields.append(("Error" if outcome in (ERROR, FAILED) else "Warning", detail))
    proof = _stored_part(boundary, stored) if stored is not None else b""
    return b"".join(
        [
            header_lines(
                [
                    (
                        "Content-Type",
                        f'multipart/report; report-type=disposition-notification; boundary="{boundary}"',
                    ),
                ]
            ),
            CRLF,
            f"--{boundary}".encode() + CRLF,
            b"Content-Type: text/plain; charset=us-ascii" + CRLF + CRLF,
            f"{human} {detail}".strip().encode("ascii", "replace") + CRLF,
            f"--{boundary}".encode() + CRLF,
            b"Content-Type: message/disposition-notification" + CRLF + CRLF,
            header_lines(fields),
            proof,
            f"--{boundary}--".encode() + CRLF,
        ]
    )


def _stored_part(boundary: str, stored: list[Stored]) -> bytes:
    """The report's third part: the instances as stored (module docstring)."""
    head = header_lines(
        [
            ("Content-Type", f'application/json; name="{STORED_PART}"'),
            ("Content-Disposition", f'inline; filename="{STORED_PART}"'),
        ]
    )
    return f"--{boundary}".encode() + CRLF + head + CRLF + stored_json(stored) + CRLF


def outer_headers(
    sender: str, recipient: str, subject: str, message_id: str, date: float
) -> list[tuple[str, str]]:
    """The headers of the mail that carries an MDN."""
    return [
        ("From", sender),
        ("To", recipient),
        ("Subject", subject),
        ("Date", formatdate(date, localtime=False, usegmt=True)),
        ("Message-ID", message_id),
        ("MIME-Version", "1.0"),
        ("Auto-Submitted", "auto-replied"),
    ]


def is_report(entity: bytes) -> bool:
    """True for a disposition-notification report entity."""
    try:
        msg = parse_head(entity)
    except MailFormatError:
        return False
    return (
        msg.get_content_type().lower() == "multipart/report"
        and str(msg.get_param("report-type") or "").lower() == "disposition-notification"
    )


def read_report(entity: bytes) -> Receipt:
    """The receipt in a `multipart/report` entity; `MailFormatError` if it is not a usable MDN."""
    msg = email.message_from_bytes(entity, policy=email.policy.compat32)
    if not is_report(entity):
        raise MailFormatError("not a disposition notification")
    fields_part = next(
        (p for p in msg.walk() if p.get_content_type().lower() == "message/disposition-notification"), None
    )
    if fields_part is None:
        raise MailFormatError("report without a message/disposition-notification part")
    payload = fields_part.get_payload()
    if isinstance(payload, list):  # the email package parses message/* bodies as headers of a sub-message
        text = "".join(
            f"{k}: {v}\n" for sub in payload if isinstance(sub, email.message.Message) for k, v in sub.items()
        )
    else:
        text = str(payload)
    values: dict[str, str] = {}
    for line in re.sub(r"\r?\n[ \t]+", " ", text).splitlines():
        name, sep, value = line.partition(":")
        if sep:
            values.setdefault(name.strip().lower(), value.strip())
    original = message_id_or_empty(values.get("original-message-id"))
    disposition = values.get("disposition", "")
    m = _DISPOSITION_RE.match(disposition)
    if not original or m is None:
        raise MailFormatError("MDN without Original-Message-ID or Disposition")
    dtype, modifier = m.group(3).lower(), (m.group(4) or "").lower()
    if dtype in ("displayed", "processed", "dispatched"):
        outcome = WARNING if modifier in ("warning", "error") else OK
    elif dtype in ("deleted", "denied", "failed"):
        outcome = ERROR if modifier == "error" else FAILED
    else:
        raise MailFormatError(f"MDN with an unknown disposition type {dtype!r}")
    detail = values.get("error") or values.get("warning") or values.get("failure") or ""
    detail = "".join(c for c in detail if c.isprintable())  # shown on our status page: no control characters
    mic = None
    m_mic = _MIC_RE.match(values.get("received-content-mic", ""))
    if m_mic and m_mic.group(2).lower() == "sha-256":
        mic = m_mic.group(1)
    stored, unreadable = None, ""
    part = next(
        (p for p in msg.walk() if p.get_content_type().lower() == "application/json"),
        None,
    )
    if part is not None:
        body = part.get_payload(decode=True)
        try:
            stored = read_stored(body if isinstance(body, bytes) else b"")
        except (ValueError, RecursionError) as exc:
            unreadable = f"unreadable instance list: {str(exc)[:120]}"
    return Receipt(original, outcome, detail[:900], mic, stored, unreadable)


def original_subject(msg_headers: bytes) -> str:
    """Subject of an entity's headers (for the MDN's own subject line)."""
    msg = parse_head(msg_headers)
    return (header(msg, "Subject") or "").strip()[:200]
