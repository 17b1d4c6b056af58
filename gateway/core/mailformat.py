"""DICOM e-mail in the DICOM standard's S/MIME form (PS3.12 Annex K, PS3.15 B.8), built and opened.

Pure: bytes in, bytes out; no sockets, no clock (dates and ids are passed in).

A mail, from the outside in:

    From/To/Subject/Date/Message-ID, X-TELEMEDICINE-SETID / -SETPART / -SETTOTAL
    application/pkcs7-mime; smime-type=enveloped-data        AES-256 for the partner's certificate
      └ multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256
          ├ multipart/mixed  + X-TELEMEDICINE-STUDYID / -SETID / -SETPART / -SETTOTAL   (signed)
          │    └ application/dicom; id="IM000001"; name="IM000001.dcm"   base64, one per instance
          └ application/pkcs7-signature (detached, the gateway's certificate)

The set headers are repeated inside the signed part; only the signed copies are trusted. The Study Instance
UID is carried only inside the encryption. Builders write CRLF text directly (Python's `email` generator is
several times slower for large parts); readers accept what other S/MIME software (OpenSSL, mail clients) sends:
detached `multipart/signed` or opaque `signed-data`, CRLF or LF line ends.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
import secrets
from dataclasses import dataclass
from email.message import Message
from email.utils import formatdate, parseaddr

from cryptography import x509

from gateway.core import smime
from gateway.core.smime import Identity

CRLF = b"\r\n"
SUBJECT_DEFAULT = "DICOM-eMail"
H_STUDY = "X-TELEMEDICINE-STUDYID"
H_SET = "X-TELEMEDICINE-SETID"
H_PART = "X-TELEMEDICINE-SETPART"
H_TOTAL = "X-TELEMEDICINE-SETTOTAL"
_B64_LINE = 76
# Headers, boundaries, the signature (with the signer certificate) and the recipient info, generously.
_FIXED_OVERHEAD = 16 * 1024
_PER_PART_OVERHEAD = 400
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Limits against hostile mails: no legitimate DICOM mail comes near them.
MAX_HEADER_BYTES = 256 * 1024
MAX_PARTS = 10_000
MAX_DEPTH = 8


class MailFormatError(ValueError):
    """A mail does not have the expected structure; the message is safe to show an operator."""


def b64_len(n: int) -> int:
    """Length of base64 of n bytes in 76-character CRLF-terminated lines."""
    chars = 4 * ((n + 2) // 3)
    return chars + 2 * ((chars + _B64_LINE - 1) // _B64_LINE)


def b64_lines(data: bytes) -> bytes:
    """Base64 in 76-character lines, CRLF line ends (RFC 2045)."""
    return base64.encodebytes(data).replace(b"\n", CRLF)


def estimate_mail_size(part_sizes: list[int]) -> int:
    """An upper bound of the size on the wire of a mail carrying parts of these sizes."""
    inner = sum(b64_len(n) + _PER_PART_OVERHEAD for n in part_sizes) + 1024
    signed = inner + 8 * 1024
    der = signed + 2048
    return b64_len(der) + _FIXED_OVERHEAD


def payload_capacity(max_mail_size: int) -> int:
    """The largest single part (bytes) that still fits one mail of `max_mail_size`."""
    lo, hi = 0, max_mail_size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_mail_size([mid]) <= max_mail_size:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_mails(sizes: list[int], max_mail_size: int) -> list[list[int]]:
    """Split instances (by size, in order) into mails none of which exceeds `max_mail_size`.

    Returns lists of indexes into `sizes`. Raises `MailFormatError` for an instance that cannot fit any mail.
    Greedy in order keeps a series together and the split reproducible.
    """
    cap = payload_capacity(max_mail_size)
    mails: list[list[int]] = []
    current: list[int] = []
    current_sizes: list[int] = []
    for i, size in enumerate(sizes):
        if size > cap:
            raise MailFormatError(
                f"instance #{i + 1} has {size} bytes; one mail of max {max_mail_size} bytes carries at most {cap}"
            )
        if current and estimate_mail_size([*current_sizes, size]) > max_mail_size:
            mails.append(current)
            current, current_sizes = [], []
        current.append(i)
        current_sizes.append(size)
    if current:
        mails.append(current)
    return mails


@dataclass(frozen=True)
class MailHeader:
    """What identifies one mail of a set."""

    sender: str
    recipient: str
    subject: str
    message_id: str
    set_id: str
    part: int
    total: int
    study_uid: str
    date: float


def _header_lines(pairs: list[tuple[str, str]]) -> bytes:
    for name, value in pairs:
        if "\r" in value or "\n" in value:
            raise MailFormatError(f"header {name} contains a line break")
    return b"".join(f"{name}: {value}".encode("ascii") + CRLF for name, value in pairs)


def build_inner(header: MailHeader, parts: list[bytes]) -> bytes:
    """The signed content: multipart/mixed of application/dicom parts with the set headers."""
    boundary = "dcm-" + secrets.token_hex(16)
    out = [
        _header_lines(
            [
                ("Content-Type", f'multipart/mixed; boundary="{boundary}"'),
                (H_STUDY, header.study_uid),
                (H_SET, header.set_id),
                (H_PART, str(header.part)),
                (H_TOTAL, str(header.total)),
            ]
        ),
        CRLF,
        b"This is a DICOM e-mail (DICOM PS3.12 Annex K)." + CRLF,
    ]
    for i, data in enumerate(parts, start=1):
        file_id = f"IM{i:06d}"
        out.append(CRLF + f"--{boundary}".encode() + CRLF)
        out.append(
            _header_lines(
                [
                    ("Content-Type", f'application/dicom; id="{file_id}"; name="{file_id}.dcm"'),
                    ("Content-Transfer-Encoding", "base64"),
                    ("Content-Disposition", f'attachment; filename="{file_id}.dcm"'),
                ]
            )
        )
        out.append(CRLF)
        out.append(b64_lines(data))
    out.append(CRLF + f"--{boundary}--".encode() + CRLF)
    return b"".join(out)


def build_signed(inner: bytes, signer: Identity) -> bytes:
    """multipart/signed around `inner` with a detached CMS signature."""
    boundary = "sig-" + secrets.token_hex(16)
    sig = smime.sign_detached(inner, signer)
    return b"".join(
        [
            _header_lines(
                [
                    (
                        "Content-Type",
                        f'multipart/signed; protocol="application/pkcs7-signature"; micalg="sha-256"; boundary="{boundary}"',
                    )
                ]
            ),
            CRLF,
            b"This is an S/MIME signed message" + CRLF,
            CRLF + f"--{boundary}".encode() + CRLF,
            inner,
            CRLF + f"--{boundary}".encode() + CRLF,
            _header_lines(
                [
                    ("Content-Type", 'application/pkcs7-signature; name="smime.p7s"'),
                    ("Content-Transfer-Encoding", "base64"),
                    ("Content-Disposition", 'attachment; filename="smime.p7s"'),
                ]
            ),
            CRLF,
            b64_lines(sig),
            CRLF + f"--{boundary}--".encode() + CRLF,
        ]
    )


def build_mail(
    header: MailHeader, parts: list[bytes], signer: Identity, recipient_cert: x509.Certificate
) -> bytes:
    """One complete mail: the DICOM parts signed by `signer` and encrypted for `recipient_cert`."""
    signed = build_signed(build_inner(header, parts), signer)
    enveloped = smime.encrypt(signed, [recipient_cert])
    outer = _header_lines(
        [
            ("From", header.sender),
            ("To", header.recipient),
            ("Subject", header.subject),
            ("Date", formatdate(header.date, localtime=False, usegmt=True)),
            ("Message-ID", header.message_id),
            ("MIME-Version", "1.0"),
            (H_SET, header.set_id),
            (H_PART, str(header.part)),
            (H_TOTAL, str(header.total)),
            ("Content-Type", 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'),
            ("Content-Transfer-Encoding", "base64"),
            ("Content-Disposition", 'attachment; filename="smime.p7m"'),
        ]
    )
    return outer + CRLF + b64_lines(enveloped)


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class OuterInfo:
    """Headers readable without decrypting; not trusted, used for bookkeeping only."""

    message_id: str
    sender: str
    set_id: str | None
    part: int | None
    total: int | None


@dataclass(frozen=True)
class OpenedMail:
    """A decrypted, verified mail: who signed it, its signed set headers and its DICOM parts."""

    signer: x509.Certificate
    set_id: str | None
    part: int | None
    total: int | None
    study_uid: str | None
    parts: list[bytes]
    ignored_parts: int


def _int_or_none(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 9 else None


def _safe_id(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value if _SAFE_ID.match(value) else None


def read_outer(raw: bytes) -> OuterInfo:
    """Parse the outer headers only (cheap, even for large mails)."""
    msg, _ = _split_entity(raw)
    return OuterInfo(
        message_id=(_header(msg, "Message-ID") or "").strip()[:250],
        sender=parseaddr(_header(msg, "From") or "")[1].lower(),
        set_id=_safe_id(_header(msg, H_SET)),
        part=_int_or_none(_header(msg, H_PART)),
        total=_int_or_none(_header(msg, H_TOTAL)),
    )


def _split_entity(entity: bytes) -> tuple[Message, bytes]:
    """Headers parsed, body as raw bytes. The first blank line ends the headers, whatever the line ends."""
    found = [
        (i, sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := entity.find(sep, 0, MAX_HEADER_BYTES + 4)) >= 0
    ]
    if not found:
        raise MailFormatError("no end of headers within the size limit (headers too large or missing body)")
    idx, sep = min(found)
    head, body = entity[: idx + len(sep)], entity[idx + len(sep) :]
    return email.message_from_bytes(head, policy=email.policy.compat32), body


def _header(msg: Message, name: str) -> str | None:
    """A header as text (compat32 returns `Header` objects for undecodable bytes), or None."""
    value = msg.get(name)
    return None if value is None else str(value)


def _content_type(msg: Message) -> str:
    return msg.get_content_type().lower()


def _signed_parts(body: bytes, boundary: str) -> tuple[bytes, bytes]:
    """The raw first part (what was signed) and the raw second part of a multipart/signed body."""
    delim = b"--" + boundary.encode("ascii", "replace")
    # Find delimiter lines: at the start of the body or after a line end.
    positions = []
    start = 0
    while True:
        i = body.find(delim, start)
        if i < 0:
            break
        if i == 0 or body[i - 1 : i] == b"\n":
            positions.append(i)
        start = i + len(delim)
    if len(positions) < 3:
        raise MailFormatError("multipart/signed without two parts")

    def part(a: int, b: int) -> bytes:
        line_end = body.find(b"\n", a)
        begin = line_end + 1
        end = b - 1  # the line break before the next delimiter belongs to the delimiter
        if end > begin and body[end - 1 : end] == b"\r":
            end -= 1
        return body[begin:end]

    return part(positions[0], positions[1]), part(positions[1], positions[2])


def _decode_b64(data: bytes) -> bytes:
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (ValueError, TypeError):
        raise MailFormatError("invalid base64") from None


def _canonical(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _unwrap_signature(entity: bytes, trusted: list[x509.Certificate]) -> tuple[x509.Certificate, bytes]:
    msg, body = _split_entity(entity)
    ctype = _content_type(msg)
    if ctype == "multipart/signed":
        boundary = msg.get_param("boundary")
        if not isinstance(boundary, str):
            raise MailFormatError("multipart/signed without boundary")
        content, sig_part = _signed_parts(body, boundary)
        sig_msg, sig_body = _split_entity(sig_part)
        if _content_type(sig_msg) not in ("application/pkcs7-signature", "application/x-pkcs7-signature"):
            raise MailFormatError(f"signature part has type {_content_type(sig_msg)}")
        sig_der = _decode_b64(sig_body)
        try:
            return smime.verify(sig_der, trusted, content=content).signer, content
        except smime.SmimeError:
            if b"\n" in content.replace(b"\r\n", b""):
                canon = _canonical(content)
                return smime.verify(sig_der, trusted, content=canon).signer, canon
            raise
    if ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        smime_type = str(msg.get_param("smime-type") or "").lower()
        if smime_type not in ("signed-data", ""):
            raise MailFormatError(f"expected a signature inside the encryption, found {smime_type}")
        verified = smime.verify(_decode_b64(body), trusted)
        return verified.signer, verified.content
    raise MailFormatError(f"mail is not signed (found {ctype} inside the encryption)")


def _check_shape(msg: Message) -> None:
    """Refuse absurd structures before walking them: nesting depth and number of parts."""
    count = 0
    stack: list[tuple[Message, int]] = [(msg, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise MailFormatError(f"MIME nesting deeper than {MAX_DEPTH} levels")
        count += 1
        if count > MAX_PARTS:
            raise MailFormatError(f"more than {MAX_PARTS} MIME parts")
        payload = node.get_payload() if node.is_multipart() else None
        if isinstance(payload, list):
            stack.extend((child, depth + 1) for child in payload if isinstance(child, Message))


def open_mail(raw: bytes, me: Identity, trusted: list[x509.Certificate]) -> OpenedMail:
    """Decrypt with `me`, verify against the pinned `trusted` certificates, return the DICOM parts.

    Raises `MailFormatError` or `smime.SmimeError` with an operator-readable reason; nothing is returned for a
    mail that is not both encrypted and signed by a trusted certificate.
    """
    outer, body = _split_entity(raw)
    ctype = _content_type(outer)
    if ctype not in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        raise MailFormatError(f"mail is not encrypted (Content-Type {ctype})")
    smime_type = str(outer.get_param("smime-type") or "enveloped-data").lower()
    if smime_type != "enveloped-data":
        raise MailFormatError(f"mail is not encrypted (smime-type {smime_type})")
    if (_header(outer, "Content-Transfer-Encoding") or "base64").strip().lower() != "base64":
        raise MailFormatError("encrypted body is not base64")
    decrypted = smime.decrypt(_decode_b64(body), me)
    signer, content = _unwrap_signature(decrypted, trusted)

    inner = email.message_from_bytes(content, policy=email.policy.compat32)
    _check_shape(inner)
    parts: list[bytes] = []
    ignored = 0
    leaves = [inner] if not inner.is_multipart() else [p for p in inner.walk() if not p.is_multipart()]
    for leaf in leaves:
        ctype = _content_type(leaf)
        disposition = (_header(leaf, "Content-Disposition") or "").lower()
        if ctype == "application/dicom":
            payload = leaf.get_payload(decode=True)
            if not isinstance(payload, bytes) or not payload:
                raise MailFormatError("an application/dicom part is empty or undecodable")
            parts.append(payload)
        elif ctype == "text/plain" and not disposition.startswith("attachment"):
            ignored += 1  # a cover note, as many senders add
        else:
            raise MailFormatError(f"mail carries a non-DICOM part ({ctype})")
    if not parts:
        raise MailFormatError("mail carries no DICOM part")
    return OpenedMail(
        signer=signer,
        set_id=_safe_id(_header(inner, H_SET)),
        part=_int_or_none(_header(inner, H_PART)),
        total=_int_or_none(_header(inner, H_TOTAL)),
        study_uid=(_header(inner, H_STUDY) or "").strip()[:64] or None,
        parts=parts,
        ignored_parts=ignored,
    )
