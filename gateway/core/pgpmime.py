"""The @GIT / DRG "DICOM E-Mail" format: PGP/MIME (RFC 3156), built and opened. Pure apart from the callables.

    From/To/Subject/Date/Message-ID, X-TELEMEDICINE-SETID / -SETPART / -SETTOTAL, Disposition-Notification-To
    multipart/encrypted; protocol="application/pgp-encrypted"
      ├ application/pgp-encrypted            "Version: 1"
      └ application/octet-stream             ASCII-armored OpenPGP message, signed and encrypted (§6.2)
           └ multipart/mixed + X-TELEMEDICINE-STUDYID / -SETID / -SETPART / -SETTOTAL
                └ application/dicom; name="IM000001.dcm"   base64, one per instance

The OpenPGP work is done by the callables the caller passes (GnuPG, `adapters.openpgp`): `encrypt(entity)` gives
the armored message; `decrypt(armored)` gives (entity, signer fingerprint or "" when the combined form carried no
signature). Inbound, the separate form (§6.1: an encrypted `multipart/signed` with `application/pgp-signature`) is
accepted too, through `verify(data, signature)`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from gateway.core.mailformat import MailHeader, outer_headers
from gateway.core.mime import (
    CRLF,
    MailFormatError,
    canonical,
    content_type,
    header_lines,
    parse_head,
    signed_parts,
    split_entity,
)

PROTOCOL = "application/pgp-encrypted"


def wrap_pgp(header: MailHeader, inner: bytes, encrypt: Callable[[bytes], bytes]) -> bytes:
    """The complete PGP/MIME mail around `inner` (a MIME entity with its own Content-Type)."""
    return header_lines(outer_headers(header)) + encrypted_entity(inner, encrypt)


def encrypted_entity(inner: bytes, encrypt: Callable[[bytes], bytes]) -> bytes:
    """`multipart/encrypted` with its Content-Type header, around the armored encryption of `inner`."""
    armored = encrypt(inner).replace(b"\r\n", b"\n").replace(b"\n", CRLF)
    boundary = "pgp-" + secrets.token_hex(16)
    return b"".join(
        [
            header_lines(
                [("Content-Type", f'multipart/encrypted; protocol="{PROTOCOL}"; boundary="{boundary}"')]
            ),
            CRLF,
            b"This is an OpenPGP/MIME encrypted message (RFC 3156)." + CRLF,
            f"--{boundary}".encode() + CRLF,
            b"Content-Type: application/pgp-encrypted" + CRLF,
            b"Content-Description: PGP/MIME version identification" + CRLF + CRLF,
            b"Version: 1" + CRLF + CRLF,
            f"--{boundary}".encode() + CRLF,
            b'Content-Type: application/octet-stream; name="encrypted.asc"' + CRLF,
            b"Content-Description: OpenPGP encrypted message" + CRLF,
            b'Content-Disposition: inline; filename="encrypted.asc"' + CRLF + CRLF,
            armored if armored.endswith(CRLF) else armored + CRLF,
            CRLF + f"--{boundary}--".encode() + CRLF,
        ]
    )


def is_pgp(raw: bytes) -> bool:
    """True when the (outer) entity is PGP/MIME encrypted."""
    try:
        msg = parse_head(raw)
    except MailFormatError:
        return False
    return (
        content_type(msg) == "multipart/encrypted"
        and str(msg.get_param("protocol") or "").lower() == PROTOCOL
    )


def unwrap_pgp(
    raw: bytes,
    decrypt: Callable[[bytes], tuple[bytes, str]],
    verify: Callable[[bytes, bytes], str],
) -> tuple[str, bytes]:
    """Decrypt a PGP/MIME mail; (signer fingerprint, signed content). Unsigned content raises."""
    msg, body = split_entity(raw)
    if not is_pgp(raw):
        raise MailFormatError(f"mail is not PGP/MIME encrypted (Content-Type {content_type(msg)})")
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str):
        raise MailFormatError("multipart/encrypted without boundary")
    control, payload = signed_parts(body, boundary)
    control_msg, control_body = split_entity(control)
    if content_type(control_msg) != PROTOCOL or b"Version: 1" not in control_body:
        raise MailFormatError("PGP/MIME control part is not 'application/pgp-encrypted', 'Version: 1'")
    _, armored = split_entity(payload)
    if b"-----BEGIN PGP MESSAGE-----" not in armored:
        raise MailFormatError("PGP/MIME payload is not an armored OpenPGP message")
    entity, signer = decrypt(armored)
    if signer:
        return signer, entity
    inner, inner_body = split_entity(entity)
    if content_type(inner) == "multipart/signed" and str(inner.get_param("protocol") or "").lower() == (
        "application/pgp-signature"
    ):
        inner_boundary = inner.get_param("boundary")
        if not isinstance(inner_boundary, str):
            raise MailFormatError("multipart/signed without boundary")
        content, sig_part = signed_parts(inner_body, inner_boundary)
        _, signature = split_entity(sig_part)
        return verify(content, signature), content
    raise MailFormatError("PGP/MIME mail is encrypted but not signed")


def signed_entity(content: bytes, sign: Callable[[bytes], bytes]) -> bytes:
    """RFC 3156 §5 multipart/signed with a detached armored signature (for receipts that need no encryption)."""
    content = canonical(content)
    signature = canonical(sign(content))
    boundary = "pgpsig-" + secrets.token_hex(16)
    return b"".join(
        [
            header_lines(
                [
                    (
                        "Content-Type",
                        f'multipart/signed; micalg="pgp-sha256"; protocol="application/pgp-signature"; boundary="{boundary}"',
                    )
                ]
            ),
            CRLF,
            f"--{boundary}".encode() + CRLF,
            content,
            CRLF + f"--{boundary}".encode() + CRLF,
            b'Content-Type: application/pgp-signature; name="signature.asc"' + CRLF + CRLF,
            signature,
            CRLF + f"--{boundary}--".encode() + CRLF,
        ]
    )
