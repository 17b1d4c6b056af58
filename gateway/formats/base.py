"""The mail-format interface and its registry: what a partner's `format` names.

A format knows four things and nothing else: the signed content a study becomes (`content`), how that content is
signed, encrypted and given its outer headers for one partner (`seal`), how a receipt for that partner is sealed
(`seal_receipt`), and how a mail in its envelope is decrypted and verified against the partner's pinned keys
(`open`, `open_signed`). Everything around it (planning, splitting, queues, the trust decisions of
`core.inbound`) is shared. Formats are pure: keys and the OpenPGP engine are handed in (`SealKeys`, `PgpOpener`).

Like httpx's transports or aiosmtpd's handlers, formats are looked up by name: `get(partner.format)`. A new format
is one module with one `register(...)` call, listed in `gateway/formats/__init__.py` (see the README's
architecture section).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, ClassVar, Protocol

from cryptography import x509

from gateway.core import mailformat, mime
from gateway.core.mailformat import MailHeader
from gateway.core.mailstream import Written
from gateway.core.mdn import content_mic
from gateway.core.smime import Identity


class PgpSealer(Protocol):
    """Our OpenPGP engine, outbound (`adapters.openpgp.OpenPgp`)."""

    def sign_encrypt(self, data: bytes, fingerprint: str) -> bytes: ...


class PgpOpener(Protocol):
    """Our OpenPGP engine, inbound (`adapters.openpgp.OpenPgp`)."""

    def decrypt_verify(self, data: bytes) -> tuple[bytes, str]: ...

    def verify_detached(self, data: bytes, signature: bytes) -> str: ...


class PartnerKeys(Protocol):
    """The pinned keys of one partner, as the address book holds them (`core.inbound.Sender`)."""

    @property
    def certs(self) -> Sequence[x509.Certificate]: ...

    @property
    def pgp_fingerprint(self) -> str: ...


@dataclass(frozen=True)
class SealKeys:
    """What sealing a mail for one partner may use; a format takes only what its `key` kind needs."""

    identity: Identity | None = None  # our S/MIME certificate and key (signing)
    recipient: x509.Certificate | None = None  # the partner's S/MIME certificate (encryption)
    pgp: PgpSealer | None = None  # our OpenPGP engine
    fingerprint: str = ""  # the partner's OpenPGP key


class OpenFailed(ValueError):
    """Decryption or verification failed; the text is for the operator (a partner only ever sees a fixed phrase)."""


class MailFormat(ABC):
    """One partner mail format. Subclass, set the class attributes, implement the abstract methods, register."""

    name: ClassVar[str]  # the `format` value in a partner's configuration
    key: ClassVar[str]  # the kind of key it needs on both sides: "smime" or "pgp"
    key_label: ClassVar[str]  # how that key is named in a refusal, e.g. "an S/MIME certificate"
    envelope: ClassVar[str]  # how its mails are named in a refusal, e.g. "S/MIME"
    content_types: ClassVar[tuple[str, ...]]  # the outer Content-Types of its (encrypted) mails
    subject_tag: ClassVar[str] = ""  # added to the Subject when missing (e.g. "DICOM-ZIP")
    growth: ClassVar[float] = 1.0  # wire bytes per DICOM byte beyond S/MIME's, for planning the split
    in_worker: ClassVar[bool] = True  # pure CPU: built and opened in worker processes (else in a thread)
    own_compression: ClassVar[frozenset[str]] = frozenset()  # compressions it applies itself (not per file)

    def content(self, header: MailHeader, parts: list[bytes], compression: str) -> bytes:
        """The entity that gets signed: by default PS3.15's multipart/mixed of application/dicom parts."""
        return mailformat.build_inner(header, parts)

    @abstractmethod
    def seal(self, header: MailHeader, content: bytes, keys: SealKeys) -> bytes:
        """The complete mail: `content` signed, encrypted for the partner, with `mailformat.outer_headers`."""

    @abstractmethod
    def seal_receipt(self, report: bytes, keys: SealKeys) -> bytes:
        """The body entity of a receipt (an RFC 3798 report) for this partner; the caller prepends the headers."""

    @abstractmethod
    def can_open(self, partner: PartnerKeys, pgp: PgpOpener | None) -> bool:
        """Whether the partner's pinned keys (and ours) allow opening a mail in this envelope at all."""

    @abstractmethod
    def open(self, raw: bytes, partner: PartnerKeys, me: Identity, pgp: PgpOpener | None) -> bytes:
        """Decrypt and verify against the partner's pinned keys; the signed content. Raises `OpenFailed`,
        `mime.MailFormatError` or `smime.SmimeError`; returns nothing that is not signed by the partner."""

    @abstractmethod
    def open_signed(self, entity: bytes, partner: PartnerKeys, pgp: PgpOpener | None) -> bytes:
        """Verify a signed, not encrypted entity (how receipts may come); the signed content, or raise."""

    def build(self, header: MailHeader, parts: list[bytes], compression: str, keys: SealKeys) -> bytes:
        """`content` then `seal`: one mail of a set."""
        return self.seal(header, self.content(header, parts, compression), keys)

    def write(
        self,
        header: MailHeader,
        parts: Sequence[tuple[BinaryIO, int]],
        compression: str,
        keys: SealKeys,
        sink: Callable[[bytes], object],
    ) -> Written:
        """One mail of a set from its parts (open files and their sizes), written to `sink`; what its receipt must
        prove. By default built whole in memory (`content`, then `seal`); a format that can, streams instead."""
        data = [source.read() for source, _ in parts]
        digests = [hashlib.sha256(d).hexdigest() for d in data]
        content = self.content(header, data, compression)
        del data  # the parts live only while the content is built, the content only while it is sealed
        mic = content_mic(content)
        mail = self.seal(header, content, keys)
        del content
        sink(mail)
        return Written(mic, digests, mime.wire_ready(mail))


_REGISTRY: dict[str, MailFormat] = {}


def register(fmt: MailFormat) -> MailFormat:
    """Make `fmt` available under its name (a name is taken once)."""
    if fmt.name in _REGISTRY and type(_REGISTRY[fmt.name]) is not type(fmt):
        raise ValueError(f"mail format {fmt.name!r} is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> MailFormat:
    """The format a partner's `format` names (KeyError for an unknown one: configuration checks it first)."""
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def for_content_type(content_type: str) -> MailFormat | None:
    """The format that opens mails of this outer Content-Type (the first registered one, for shared envelopes)."""
    ctype = content_type.lower()
    return next((f for f in _REGISTRY.values() if ctype in f.content_types), None)


def envelopes() -> list[MailFormat]:
    """One format per kind of key, in registration order: what may verify a signed-only entity."""
    seen: dict[str, MailFormat] = {}
    for f in _REGISTRY.values():
        seen.setdefault(f.key, f)
    return list(seen.values())
