"""Deciding whether an inbound mail may be ingested: pure, every check, no side effects.

`inspect_mail` returns the verified DICOM parts with their identifiers (`Accepted`), a partner's receipt
(`ReceiptIn`), or raises `Refused` with a reason an operator can read. It is the one gate between the mailbox and
storage; the hostile-mail corpus and the fuzz tests drive it directly.

Accepted shapes (per the sender's address-book entry, never chosen by the mail alone):
- S/MIME enveloped data around a signed entity (PS3.15 B.8), signed by the partner's pinned certificate;
- PGP/MIME (RFC 3156) signed and encrypted, signed by the partner's pinned OpenPGP key (by fingerprint);
- receipts (RFC 3798 MDNs): encrypted or signed as above, or plain (recorded as unsigned).
Inside: application/dicom parts, or one DICOM-ZIP archive (unpacked under limits, see `core.dicomzip`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from gateway import formats
from gateway.core import mailformat, mdn, mime, smime
from gateway.core.dicominfo import InstanceInfo, NotDicomError, read_info
from gateway.core.smime import Identity

# What a partner may be told about a refused mail: a fixed vocabulary, never exception text. A failure anywhere in
# decrypting or verifying gets one phrase, so that a refusal tells nobody whether the padding, the key transport or
# the signature failed (with AES-CBC and RSA PKCS#1 v1.5 that difference is a decryption oracle).
UNREADABLE = "could not be decrypted or its signature verified"
NOT_ENCRYPTED = "not encrypted"
SENDER_UNKNOWN = "sender not in the address book"
SENDER_KEY = "the sender's key is not valid (expired or revoked)"
MALFORMED = "malformed mail"
NOT_DICOM = "not DICOM"
INCONSISTENT = "inconsistent DICOM set"
TOO_LARGE = "too large"
PUBLIC_REASONS = frozenset(
    {UNREADABLE, NOT_ENCRYPTED, SENDER_UNKNOWN, SENDER_KEY, MALFORMED, NOT_DICOM, INCONSISTENT, TOO_LARGE}
)


class Refused(ValueError):
    """The mail must not be ingested. `reason` is for the operator (local log and catalog; never patient data),
    `public` the phrase a partner may see (one of `PUBLIC_REASONS`), `authenticated` whether the partner's
    signature was verified before the refusal (only then is the mail evidence; otherwise it is hostile until
    proven and counts against the quota for unauthenticated content)."""

    def __init__(self, reason: str, public: str = UNREADABLE, authenticated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.public = public
        self.authenticated = authenticated

    def __reduce__(self) -> tuple[type[Refused], tuple[str, str, bool]]:
        # from a worker process: all three cross the pipe (exceptions pickle only their args by default)
        return (Refused, (self.reason, self.public, self.authenticated))


class PgpOps(Protocol):
    """What the gate needs from OpenPGP (`adapters.openpgp.OpenPgp`)."""

    def decrypt_verify(self, data: bytes) -> tuple[bytes, str]: ...

    def verify_detached(self, data: bytes, signature: bytes) -> str: ...


@dataclass(frozen=True)
class Sender:
    """An address-book entry as the inbound check needs it."""

    name: str
    certs: tuple[x509.Certificate, ...]  # several during a certificate rollover
    pgp_fingerprint: str = ""
    suspended: str | None = None  # the partner's key expired or was revoked: its mails are held with this


@dataclass(frozen=True)
class Accepted:
    """A mail that passed every check, with its parts' identifiers."""

    partner: str
    transfer_id: str
    part: int
    total: int
    study_uid: str | None
    parts: list[tuple[InstanceInfo, bytes]]
    mic: str = ""  # the digest of the signed content, for the receipt (`mdn.content_mic`)


@dataclass(frozen=True)
class ReceiptIn:
    """A partner's receipt for one of our mails."""

    partner: str
    receipt: mdn.Receipt
    signed: bool


def _unwrap(
    raw: bytes, outer: mailformat.OuterInfo, sender: Sender, me: Identity, pgp: PgpOps | None
) -> tuple[bytes, bool, bool]:
    """(verified content, signed, encrypted), through the format whose envelope the mail has. A signed-only entity
    (how receipts may come) is verified by each kind of key the partner has; anything else is neither."""
    fmt = formats.for_content_type(outer.content_type)
    if fmt is not None:
        if not fmt.can_open(sender, pgp):
            raise Refused(
                f"{fmt.envelope} mail from a partner without {fmt.key_label} in the address book", SENDER_KEY
            )
        try:
            return fmt.open(raw, sender, me, pgp), True, True
        except formats.OpenFailed as exc:
            raise Refused(str(exc)) from None
    entity = _content_entity(raw)
    if outer.content_type != "multipart/signed":
        return entity, False, False
    failure: Exception = Refused("signed mail that no key of the partner verifies")
    for envelope in formats.envelopes():
        if not envelope.can_open(sender, pgp):
            continue
        try:
            return envelope.open_signed(entity, sender, pgp), True, False
        except formats.OpenFailed as exc:
            failure = Refused(str(exc))
        except (mailformat.MailFormatError, smime.SmimeError) as exc:
            failure = exc
    raise failure


def _content_entity(raw: bytes) -> bytes:
    """The mail's body as a MIME entity: its Content-* headers and body (outer routing headers dropped)."""
    msg, body = mime.split_entity(raw)
    lines = [(k, str(v)) for k, v in msg.items() if k.lower().startswith("content-")]
    try:
        return mime.header_lines(lines) + mime.CRLF + body
    except mailformat.MailFormatError:
        raise Refused("content headers with line breaks", MALFORMED) from None
    except UnicodeEncodeError:
        raise Refused("content headers that are not ASCII", MALFORMED) from None


def inspect_mail(
    raw: bytes,
    me: Identity,
    address_book: Mapping[str, Sender],
    pgp: PgpOps | None = None,
    max_unpacked: int = 1024**3,
) -> Accepted | ReceiptIn:
    """Decrypt, verify against the sender's pinned key, check every part is DICOM; or raise `Refused`.

    `address_book` maps lower-case mail addresses to senders.
    """
    authenticated = False
    try:
        outer = mailformat.read_outer(raw)
        sender = address_book.get(outer.sender)
        if sender is None:
            raise Refused("sender is not in the address book", SENDER_UNKNOWN)
        if sender.suspended:
            raise Refused(f"partner {sender.name} is suspended: {sender.suspended}", SENDER_KEY)
        content, signed, encrypted = _unwrap(raw, outer, sender, me, pgp)
        authenticated = signed
        if mdn.is_report(content):
            return ReceiptIn(sender.name, mdn.read_report(content), signed)
        if not encrypted:
            raise Refused(f"mail is not encrypted (Content-Type {outer.content_type})", NOT_ENCRYPTED)
        opened = mailformat.read_payload(content, sender.name, max_unpacked)
    except Refused as exc:
        raise Refused(exc.reason, exc.public, authenticated) from None
    except (mailformat.MailFormatError, smime.SmimeError) as exc:
        # before the signature is verified every failure reads the same to the partner (see UNREADABLE)
        raise Refused(str(exc), MALFORMED if authenticated else UNREADABLE, authenticated) from None
    except RecursionError:
        raise Refused("MIME structure nested too deeply", MALFORMED, authenticated) from None
    parts = []
    for number, data in enumerate(opened.parts, start=1):
        try:
            parts.append((read_info(data), data))
        except NotDicomError as exc:
            raise Refused(f"part {number} is not DICOM: {exc}", NOT_DICOM, True) from None
    sops = [info.sop_instance_uid for info, _ in parts]
    if len(set(sops)) != len(sops):
        raise Refused("the same SOP Instance UID appears twice in one mail", INCONSISTENT, True)
    set_id = opened.set_id or hashlib.sha256(outer.message_id.encode() or raw[:4096]).hexdigest()[:32]
    part = 1 if opened.part is None else opened.part
    total = 1 if opened.total is None else opened.total
    if not 1 <= part <= total:
        raise Refused(f"set part {part} of {total} is impossible", INCONSISTENT, True)
    return Accepted(
        sender.name, f"{sender.name}:{set_id}", part, total, opened.study_uid, parts, mdn.content_mic(content)
    )
