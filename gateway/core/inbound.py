"""Deciding whether an inbound mail may be ingested: pure, every check, no side effects.

`inspect_mail` either returns the verified DICOM parts with their identifiers, or raises `Refused` with a reason
an operator can read. It is the one gate between the mailbox and storage; the hostile-mail corpus and the fuzz
tests drive it directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509

from gateway.core import mailformat, smime
from gateway.core.dicominfo import InstanceInfo, NotDicomError, read_info
from gateway.core.smime import Identity


class Refused(ValueError):
    """The mail must not be ingested; `reason` says why (never patient data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Sender:
    """An address-book entry as the inbound check needs it."""

    name: str
    certs: tuple[x509.Certificate, ...]  # several during a certificate rollover


@dataclass(frozen=True)
class Accepted:
    """A mail that passed every check, with its parts' identifiers."""

    partner: str
    transfer_id: str
    part: int
    total: int
    study_uid: str | None
    parts: list[tuple[InstanceInfo, bytes]]


def inspect_mail(raw: bytes, me: Identity, address_book: Mapping[str, Sender]) -> Accepted:
    """Decrypt, verify against the sender's pinned certificate, check every part is DICOM; or raise `Refused`.

    `address_book` maps lower-case mail addresses to senders.
    """
    try:
        outer = mailformat.read_outer(raw)
        sender = address_book.get(outer.sender)
        if sender is None:
            raise Refused("sender is not in the address book")
        opened = mailformat.open_mail(raw, me, list(sender.certs))
    except (mailformat.MailFormatError, smime.SmimeError) as exc:
        raise Refused(str(exc)) from None
    except RecursionError:
        raise Refused("MIME structure nested too deeply") from None
    parts = []
    for number, data in enumerate(opened.parts, start=1):
        try:
            parts.append((read_info(data), data))
        except NotDicomError as exc:
            raise Refused(f"part {number} is not DICOM: {exc}") from None
    sops = [info.sop_instance_uid for info, _ in parts]
    if len(set(sops)) != len(sops):
        raise Refused("the same SOP Instance UID appears twice in one mail")
    set_id = opened.set_id or hashlib.sha256(outer.message_id.encode() or raw[:4096]).hexdigest()[:32]
    part = 1 if opened.part is None else opened.part
    total = 1 if opened.total is None else opened.total
    if not 1 <= part <= total:
        raise Refused(f"set part {part} of {total} is impossible")
    return Accepted(sender.name, f"{sender.name}:{set_id}", part, total, opened.study_uid, parts)
