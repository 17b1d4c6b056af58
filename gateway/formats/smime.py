"""`smime`: DICOM e-mail as the standard defines it (PS3.12 Annex K, PS3.15 B.8): application/dicom parts, signed
(CMS, detached) and encrypted (AES-256, the partner's certificate). Receipts are signed, not encrypted."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import BinaryIO, ClassVar

from gateway.core import mailformat, mailstream
from gateway.core.mailformat import MailHeader
from gateway.core.mailstream import Written
from gateway.core.smime import Identity
from gateway.formats.base import MailFormat, PartnerKeys, PgpOpener, SealKeys, register


class SmimeFormat(MailFormat):
    name: ClassVar[str] = "smime"
    key: ClassVar[str] = "smime"
    key_label: ClassVar[str] = "an S/MIME certificate"
    envelope: ClassVar[str] = "S/MIME"
    content_types: ClassVar[tuple[str, ...]] = ("application/pkcs7-mime", "application/x-pkcs7-mime")

    def seal(self, header: MailHeader, content: bytes, keys: SealKeys) -> bytes:
        if keys.identity is None or keys.recipient is None:
            raise mailformat.MailFormatError(f"{self.name}: no S/MIME certificate for the partner or for us")
        return mailformat.wrap_smime(header, content, keys.identity, keys.recipient)

    def write(
        self,
        header: MailHeader,
        parts: Sequence[tuple[BinaryIO, int]],
        compression: str,
        keys: SealKeys,
        sink: Callable[[bytes], object],
    ) -> Written:
        """Streamed: read, base64, hash, encrypt and write a piece at a time (`mailstream.write_smime`)."""
        if keys.identity is None or keys.recipient is None:
            raise mailformat.MailFormatError(f"{self.name}: no S/MIME certificate for the partner or for us")
        return mailstream.write_smime(header, parts, keys.identity, keys.recipient, sink)

    def seal_receipt(self, report: bytes, keys: SealKeys) -> bytes:
        if keys.identity is None:
            raise mailformat.MailFormatError("no S/MIME identity of ours to sign the receipt")
        return mailformat.build_signed(report, keys.identity)

    def can_open(self, partner: PartnerKeys, pgp: PgpOpener | None) -> bool:
        return bool(partner.certs)

    def open(self, raw: bytes, partner: PartnerKeys, me: Identity, pgp: PgpOpener | None) -> bytes:
        return mailformat.unwrap_smime(raw, me, list(partner.certs))[1]

    def open_signed(self, entity: bytes, partner: PartnerKeys, pgp: PgpOpener | None) -> bytes:
        return mailformat.unwrap_signed(entity, list(partner.certs))[1]


register(SmimeFormat())
