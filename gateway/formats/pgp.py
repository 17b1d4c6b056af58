"""`pgp`: the German @GIT / DRG "DICOM E-Mail" format, PGP/MIME (RFC 3156) signed and encrypted with the
partner's pinned OpenPGP key. GnuPG does the OpenPGP work (`adapters.openpgp`), so mails are built and opened in a
thread, not a worker process. Receipts are encrypted too."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from gateway.core import mime, pgpmime
from gateway.core.mailformat import MailHeader
from gateway.core.smime import Identity
from gateway.formats.base import MailFormat, OpenFailed, PartnerKeys, PgpOpener, SealKeys, register


class PgpFormat(MailFormat):
    name: ClassVar[str] = "pgp"
    key: ClassVar[str] = "pgp"
    key_label: ClassVar[str] = "an OpenPGP key"
    envelope: ClassVar[str] = "PGP/MIME"
    content_types: ClassVar[tuple[str, ...]] = ("multipart/encrypted",)
    growth: ClassVar[float] = 1.04  # base64 inside an armored (compressed) message
    in_worker: ClassVar[bool] = False

    @staticmethod
    def _sealer(keys: SealKeys) -> Callable[[bytes], bytes]:
        pgp = keys.pgp
        if pgp is None or not keys.fingerprint:
            raise mime.MailFormatError("pgp partner but no [pgp] key configured")
        return lambda data: pgp.sign_encrypt(data, keys.fingerprint)

    def seal(self, header: MailHeader, content: bytes, keys: SealKeys) -> bytes:
        return pgpmime.wrap_pgp(header, content, self._sealer(keys))

    def seal_receipt(self, report: bytes, keys: SealKeys) -> bytes:
        return pgpmime.encrypted_entity(report, self._sealer(keys))

    def can_open(self, partner: PartnerKeys, pgp: PgpOpener | None) -> bool:
        return pgp is not None and bool(partner.pgp_fingerprint)

    def open(self, raw: bytes, partner: PartnerKeys, me: Identity, pgp: PgpOpener | None) -> bytes:
        assert pgp is not None  # can_open said so
        try:
            signer, content = pgpmime.unwrap_pgp(raw, pgp.decrypt_verify, pgp.verify_detached)
        except mime.MailFormatError:
            raise
        except ValueError as exc:  # GnuPG's refusal, as adapters.openpgp reports it
            raise OpenFailed(str(exc)) from None
        return self._check(signer, partner, content)

    def open_signed(self, entity: bytes, partner: PartnerKeys, pgp: PgpOpener | None) -> bytes:
        assert pgp is not None
        msg, body = mime.split_entity(entity)
        boundary = msg.get_param("boundary")
        if not isinstance(boundary, str):
            raise mime.MailFormatError("multipart/signed without boundary")
        content, sig_part = mime.signed_parts(body, boundary)
        _, signature = mime.split_entity(sig_part)
        try:
            signer = pgp.verify_detached(content, signature)
        except ValueError as exc:
            raise OpenFailed(str(exc)) from None
        return self._check(signer, partner, content)

    @staticmethod
    def _check(signer: str, partner: PartnerKeys, content: bytes) -> bytes:
        if signer != partner.pgp_fingerprint:
            raise OpenFailed("signed by an OpenPGP key other than the partner's")
        return content


register(PgpFormat())
