"""Receipts: RFC 3798 Message Disposition Notifications, built and read. Pure.

The dispositions the @GIT recommendation uses, by outcome of an inbound mail:

    OK       automatic-action/MDN-sent-automatically; displayed
    WARNING  automatic-action/MDN-sent-automatically; displayed/warning   (stored, but e.g. a PACS refused some)
    ERROR    automatic-action/MDN-sent-automatically; deleted/error       (not stored; a resend may work)
    FAILED   automatic-action/MDN-sent-automatically; deleted             (not stored; refused for good)

An MDN is `multipart/report; report-type=disposition-notification` with a human-readable part and the
`message/disposition-notification` part; it carries no patient data (ids and reasons only). Signing and, for
PGP partners, encryption are added around it by the caller, like any outbound mail.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
import secrets
from dataclasses import dataclass
from email.utils import formatdate

from gateway.core.mime import CRLF, MailFormatError, header, header_lines, message_id_or_empty, parse_head
from gateway.core.states import RECEIPT_OUTCOMES

MODE = "automatic-action/MDN-sent-automatically"
OUTCOMES = RECEIPT_OUTCOMES  # the state table's receipt outcomes (core.states), in this order:
OK, WARNING, ERROR, FAILED = OUTCOMES
_DISPOSITION_RE = re.compile(r"^\s*([\w/-]+)\s*/\s*([\w-]+)\s*;\s*([\w-]+)(?:\s*/\s*([\w-]+))?", re.ASCII)


@dataclass(frozen=True)
class Receipt:
    """What a partner's MDN says about one of our mails."""

    original_message_id: str
    outcome: str  # one of OUTCOMES
    detail: str


def build_report(
    *,
    sender: str,
    original_message_id: str,
    outcome: str,
    detail: str,
    reporting_ua: str = "dicom-mail-gateway",
) -> bytes:
    """The MDN as a MIME entity with its own Content-Type (sign/encrypt it, then add the outer headers)."""
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
    if detail:
        fields.append(("Error" if outcome in (ERROR, FAILED) else "Warning", detail))
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
            f"--{boundary}--".encode() + CRLF,
        ]
    )


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
    return Receipt(original, outcome, detail[:900])


def original_subject(msg_headers: bytes) -> str:
    """Subject of an entity's headers (for the MDN's own subject line)."""
    msg = parse_head(msg_headers)
    return (header(msg, "Subject") or "").strip()[:200]
