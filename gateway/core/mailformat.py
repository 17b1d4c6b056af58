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

import re
import secrets
from dataclasses import dataclass
from email.utils import formatdate

from cryptography import x509

from gateway.core import mime, smime
from gateway.core.mime import CRLF, MailFormatError
from gateway.core.smime import Identity

SUBJECT_DEFAULT = "DICOM-eMail"
H_STUDY = "X-TELEMEDICINE-STUDYID"
H_SET = "X-TELEMEDICINE-SETID"
H_PART = "X-TELEMEDICINE-SETPART"
H_TOTAL = "X-TELEMEDICINE-SETTOTAL"
H_NOTIFY = "X-TELEMEDICINE-DISPOSITION-NOTIFICATION-TO"
# Headers, boundaries, the signature (with the signer certificate) and the recipient info, generously.
_FIXED_OVERHEAD = 16 * 1024
_PER_PART_OVERHEAD = 400
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def estimate_mail_size(part_sizes: list[int]) -> int:
    """An upper bound of the size on the wire of a mail carrying parts of these sizes."""
    inner = sum(mime.b64_len(n) + _PER_PART_OVERHEAD for n in part_sizes) + 1024
    signed = inner + 8 * 1024
    der = signed + 2048
    return mime.b64_len(der) + _FIXED_OVERHEAD


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
    notify: str = ""  # Disposition-Notification-To: where the partner sends its receipt ("" = none wanted)


def _set_headers(header: MailHeader, boundary: str) -> list[tuple[str, str]]:
    return [
        ("Content-Type", f'multipart/mixed; boundary="{boundary}"'),
        (H_STUDY, header.study_uid),
        (H_SET, header.set_id),
        (H_PART, str(header.part)),
        (H_TOTAL, str(header.total)),
    ]


def inner_frame(header: MailHeader, count: int) -> tuple[bytes, list[bytes], bytes]:
    """The signed content around `count` DICOM parts: (head, each part's head, tail); the content is
    head + Σ(part head + base64 lines of the part) + tail."""
    boundary = "dcm-" + secrets.token_hex(16)
    head = mime.header_lines(_set_headers(header, boundary)) + CRLF
    head += b"This is a DICOM e-mail (DICOM PS3.12 Annex K)." + CRLF
    part_heads = []
    for i in range(1, count + 1):
        file_id = f"IM{i:06d}"
        part_heads.append(
            CRLF
            + f"--{boundary}".encode()
            + CRLF
            + mime.header_lines(
                [
                    ("Content-Type", f'application/dicom; id="{file_id}"; name="{file_id}.dcm"'),
                    ("Content-Transfer-Encoding", "base64"),
                    ("Content-Disposition", f'attachment; filename="{file_id}.dcm"'),
                ]
            )
            + CRLF
        )
    return head, part_heads, CRLF + f"--{boundary}--".encode() + CRLF


def build_inner(header: MailHeader, parts: list[bytes]) -> bytes:
    """The signed content: multipart/mixed of application/dicom parts with the set headers."""
    head, part_heads, tail = inner_frame(header, len(parts))
    out = [head]
    for part_head, data in zip(part_heads, parts, strict=True):
        out += [part_head, mime.b64_lines(data)]
    out.append(tail)
    return b"".join(out)


def build_inner_zip(header: MailHeader, archive: bytes) -> bytes:
    """The signed content of a DICOM-ZIP mail (PS3.11 Annex L): one application/zip part named DICOM.ZIP."""
    boundary = "zip-" + secrets.token_hex(16)
    return b"".join(
        [
            mime.header_lines(_set_headers(header, boundary)),
            CRLF,
            b"This is a DICOM-ZIP e-mail (DICOM PS3.11 Annex L)." + CRLF,
            CRLF + f"--{boundary}".encode() + CRLF,
            mime.header_lines(
                [
                    ("Content-Type", 'application/zip; id="DICOM.ZIP"; name="DICOM.ZIP"'),
                    ("Content-Transfer-Encoding", "base64"),
                    ("Content-Disposition", 'attachment; filename="DICOM.ZIP"'),
                ]
            ),
            CRLF,
            mime.b64_lines(archive),
            CRLF + f"--{boundary}--".encode() + CRLF,
        ]
    )


def outer_headers(header: MailHeader) -> list[tuple[str, str]]:
    """The readable headers of every outbound DICOM mail (no patient data, no Study UID)."""
    pairs = [
        ("From", header.sender),
        ("To", header.recipient),
        ("Subject", header.subject),
        ("Date", formatdate(header.date, localtime=False, usegmt=True)),
        ("Message-ID", header.message_id),
        ("MIME-Version", "1.0"),
        (H_SET, header.set_id),
        (H_PART, str(header.part)),
        (H_TOTAL, str(header.total)),
    ]
    if header.notify:
        pairs += [("Disposition-Notification-To", header.notify), (H_NOTIFY, header.notify)]
    return pairs


def signed_frame() -> tuple[bytes, bytes, bytes]:
    """multipart/signed around a content and its detached signature: (head, middle, tail); the entity is
    head + content + middle + base64 lines of the signature + tail."""
    boundary = "sig-" + secrets.token_hex(16)
    content_type = (
        f'multipart/signed; protocol="application/pkcs7-signature"; micalg="sha-256"; boundary="{boundary}"'
    )
    head = mime.header_lines([("Content-Type", content_type)]) + CRLF
    head += b"This is an S/MIME signed message" + CRLF + CRLF + f"--{boundary}".encode() + CRLF
    middle = CRLF + f"--{boundary}".encode() + CRLF
    middle += mime.header_lines(
        [
            ("Content-Type", 'application/pkcs7-signature; name="smime.p7s"'),
            ("Content-Transfer-Encoding", "base64"),
            ("Content-Disposition", 'attachment; filename="smime.p7s"'),
        ]
    )
    return head, middle + CRLF, CRLF + f"--{boundary}--".encode() + CRLF


def build_signed(inner: bytes, signer: Identity) -> bytes:
    """multipart/signed around `inner` with a detached CMS signature."""
    head, middle, tail = signed_frame()
    return b"".join([head, inner, middle, mime.b64_lines(smime.sign_detached(inner, signer)), tail])


def build_mail(
    header: MailHeader,
    parts: list[bytes],
    signer: Identity,
    recipient_cert: x509.Certificate,
    *,
    inner: bytes | None = None,
) -> bytes:
    """One complete S/MIME mail: the DICOM parts (or a prepared `inner` entity) signed and encrypted."""
    return wrap_smime(
        header, inner if inner is not None else build_inner(header, parts), signer, recipient_cert
    )


def smime_outer(header: MailHeader) -> bytes:
    return (
        mime.header_lines(
            [
                *outer_headers(header),
                ("Content-Type", 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'),
                ("Content-Transfer-Encoding", "base64"),
                ("Content-Disposition", 'attachment; filename="smime.p7m"'),
            ]
        )
        + CRLF
    )


def wrap_smime(header: MailHeader, inner: bytes, signer: Identity, recipient_cert: x509.Certificate) -> bytes:
    """`inner` signed by `signer` and encrypted for the recipient (PS3.15 B.8), with the outer headers."""
    signed = build_signed(inner, signer)
    enveloped = smime.encrypt(signed, [recipient_cert])
    del signed  # large mails: hold as few copies at once as possible
    return mime.b64_lines(enveloped, prefix=smime_outer(header))


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class OuterInfo:
    """Headers readable without decrypting; not trusted, used for bookkeeping only."""

    message_id: str
    sender: str
    set_id: str | None
    part: int | None
    total: int | None
    content_type: str = ""
    notify: str = ""  # Disposition-Notification-To (a receipt is wanted)
    subject: str = ""


@dataclass(frozen=True)
class OpenedMail:
    """A decrypted, verified mail: who signed it, its signed set headers and its DICOM parts."""

    signer: object  # the certificate (S/MIME) or the key fingerprint (OpenPGP) that signed it
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
    msg = mime.parse_head(raw)
    return OuterInfo(
        message_id=mime.message_id_or_empty(mime.header(msg, "Message-ID")),
        sender=mime.address_or_empty(mime.header(msg, "From")),
        set_id=_safe_id(mime.header(msg, H_SET)),
        part=_int_or_none(mime.header(msg, H_PART)),
        total=_int_or_none(mime.header(msg, H_TOTAL)),
        content_type=mime.content_type(msg),
        notify=mime.address_or_empty(mime.header(msg, "Disposition-Notification-To")),
        subject=(mime.header(msg, "Subject") or "").strip()[:200],
    )


def _unwrap_signature(entity: bytes, trusted: list[x509.Certificate]) -> tuple[x509.Certificate, bytes]:
    msg, body = mime.split_entity(entity)
    ctype = mime.content_type(msg)
    if ctype == "multipart/signed":
        boundary = msg.get_param("boundary")
        if not isinstance(boundary, str):
            raise MailFormatError("multipart/signed without boundary")
        del entity  # a large mail's copies go as the next is made (the caller passed it on)
        content, sig_part = mime.signed_parts(body, boundary)
        del body
        sig_msg, sig_body = mime.split_entity(sig_part)
        if mime.content_type(sig_msg) not in ("application/pkcs7-signature", "application/x-pkcs7-signature"):
            raise MailFormatError(f"signature part has type {mime.content_type(sig_msg)}")
        sig_der = mime.decode_b64_strict(sig_body)
        try:
            return smime.verify(sig_der, trusted, content=content).signer, content
        except smime.SmimeError:
            if b"\n" in content.replace(b"\r\n", b""):
                canon = mime.canonical(content)
                return smime.verify(sig_der, trusted, content=canon).signer, canon
            raise
    if ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        smime_type = str(msg.get_param("smime-type") or "").lower()
        if smime_type not in ("signed-data", ""):
            raise MailFormatError(f"expected a signature inside the encryption, found {smime_type}")
        verified = smime.verify(mime.decode_b64_strict(body), trusted)
        return verified.signer, verified.content
    raise MailFormatError(f"mail is not signed (found {ctype} inside the encryption)")


def unwrap_smime(raw: bytes, me: Identity, trusted: list[x509.Certificate]) -> tuple[x509.Certificate, bytes]:
    """Decrypt an S/MIME enveloped mail with `me` and verify its signature; (signer, signed content)."""
    outer, body = mime.split_entity(raw)
    ctype = mime.content_type(outer)
    if ctype not in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        raise MailFormatError(f"mail is not encrypted (Content-Type {ctype})")
    smime_type = str(outer.get_param("smime-type") or "enveloped-data").lower()
    if smime_type != "enveloped-data":
        raise MailFormatError(f"mail is not encrypted (smime-type {smime_type})")
    if (mime.header(outer, "Content-Transfer-Encoding") or "base64").strip().lower() != "base64":
        raise MailFormatError("encrypted body is not base64")
    der = mime.decode_b64_strict(body)
    del body  # large mails: each stage's copy goes before the next is made
    return _unwrap_signature(smime.decrypt(der, me), trusted)


def unwrap_signed(entity: bytes, trusted: list[x509.Certificate]) -> tuple[x509.Certificate, bytes]:
    """Verify a signed (not encrypted) entity, as receipts come; (signer, signed content)."""
    return _unwrap_signature(entity, trusted)


def read_payload(content: bytes, signer: object, max_unpacked: int = 1024**3) -> OpenedMail:
    """The DICOM instances of a verified entity: application/dicom parts or a DICOM-ZIP archive.

    One file per mail (a single application/dicom entity, as some @GIT senders do) is accepted too.
    """
    from gateway.core import dicomzip

    inner, leaves = mime.leaves(content)
    parts: list[bytes] = []
    ignored = 0
    for leaf, body in leaves:
        ctype = mime.content_type(leaf)
        disposition = (mime.header(leaf, "Content-Disposition") or "").lower()
        name = str(leaf.get_param("name") or leaf.get_filename() or "").upper()
        if ctype == "application/dicom":
            payload = mime.decoded(leaf, body)
            if not payload:
                raise MailFormatError("an application/dicom part is empty or undecodable")
            parts.append(payload)
        elif ctype in ("application/zip", "application/x-zip-compressed") or (
            ctype == "application/octet-stream" and name == dicomzip.ZIP_NAME
        ):
            archive = mime.decoded(leaf, body)
            if not archive:
                raise MailFormatError("the DICOM-ZIP part is empty or undecodable")
            try:
                parts.extend(dicomzip.read_zip(archive, max_unpacked - sum(map(len, parts))))
            except dicomzip.ZipRefused as exc:
                raise MailFormatError(f"DICOM-ZIP refused: {exc}") from None
        elif ctype == "text/plain" and not disposition.startswith("attachment"):
            ignored += 1  # a cover note, as many senders add
        else:
            raise MailFormatError(f"mail carries a non-DICOM part ({ctype})")
    if not parts:
        raise MailFormatError("mail carries no DICOM part")
    return OpenedMail(
        signer=signer,
        set_id=_safe_id(mime.header(inner, H_SET)),
        part=_int_or_none(mime.header(inner, H_PART)),
        total=_int_or_none(mime.header(inner, H_TOTAL)),
        study_uid=(mime.header(inner, H_STUDY) or "").strip()[:64] or None,
        parts=parts,
        ignored_parts=ignored,
    )


def open_mail(
    raw: bytes, me: Identity, trusted: list[x509.Certificate], max_unpacked: int = 1024**3
) -> OpenedMail:
    """Decrypt with `me`, verify against the pinned `trusted` certificates, return the DICOM parts.

    Raises `MailFormatError` or `smime.SmimeError` with an operator-readable reason; nothing is returned for a
    mail that is not both encrypted and signed by a trusted certificate.
    """
    signer, content = unwrap_smime(raw, me, trusted)
    return read_payload(content, signer, max_unpacked)
