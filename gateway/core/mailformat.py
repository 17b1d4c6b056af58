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

import binascii
import email
import email.policy
import quopri
import re
import secrets
from dataclasses import dataclass
from email.message import Message
from email.utils import formatdate, parseaddr

import numpy as np
from cryptography import x509

from gateway.core import smime
from gateway.core.smime import Identity

CRLF = b"\r\n"
SUBJECT_DEFAULT = "DICOM-eMail"
H_STUDY = "X-TELEMEDICINE-STUDYID"
H_SET = "X-TELEMEDICINE-SETID"
H_PART = "X-TELEMEDICINE-SETPART"
H_TOTAL = "X-TELEMEDICINE-SETTOTAL"
H_NOTIFY = "X-TELEMEDICINE-DISPOSITION-NOTIFICATION-TO"
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


def b64_lines(data: bytes, prefix: bytes = b"") -> bytes:
    """`prefix`, then `data` in base64 of 76-character lines with CRLF line ends (RFC 2045).

    One base64 pass over the whole input, then the line ends are laid in with one strided copy into the result:
    several times faster than `base64.encodebytes` (57 bytes at a time), and no further copy of a large mail for
    its headers. The result is a bytearray (a bytes-like object every caller accepts), so it is not copied again.
    """
    encoded = binascii.b2a_base64(data, newline=False)
    full, rest = divmod(len(encoded), _B64_LINE)
    start = len(prefix)
    body = full * (_B64_LINE + 2)
    out = bytearray(start + body + (rest + 2 if rest else 0))
    out[:start] = prefix
    lines = np.frombuffer(out, dtype=np.uint8, count=body, offset=start).reshape(full, _B64_LINE + 2)
    lines[:, :_B64_LINE] = np.frombuffer(encoded, dtype=np.uint8, count=full * _B64_LINE).reshape(
        full, _B64_LINE
    )
    lines[:, _B64_LINE] = 13
    lines[:, _B64_LINE + 1] = 10
    del lines
    if rest:
        out[start + body :] = encoded[full * _B64_LINE :] + CRLF
    return out  # type: ignore[return-value]  # bytearray: bytes-like, mutable only here


_B64_CHUNK = 1 << 22  # characters decoded per step (a multiple of 4)


def b64_decode(data: bytes) -> bytes:
    """Strict base64 with line ends and blanks ignored; `binascii.Error` if anything else is off.

    Line ends are dropped in one `translate`, then `binascii` decodes strictly in 4 MB steps (about 350 MB/s
    here; each step holds the interpreter lock for about 10 ms, so a 27 MB body never stalls the event loop
    for long). Padding is only allowed at the very end.
    """
    clean = data.translate(None, b" \t\r\n")
    if len(clean) % 4:
        raise binascii.Error("base64 length is not a multiple of 4")
    if clean.find(b"=", 0, max(0, len(clean) - 2)) >= 0:
        raise binascii.Error("base64 padding before the end")  # a step boundary must not hide it
    out = bytearray()
    view = memoryview(clean)
    for start in range(0, len(clean), _B64_CHUNK):
        out += binascii.a2b_base64(view[start : start + _B64_CHUNK], strict_mode=True)
    return bytes(out)


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
    notify: str = ""  # Disposition-Notification-To: where the partner sends its receipt ("" = none wanted)


def _header_lines(pairs: list[tuple[str, str]]) -> bytes:
    for name, value in pairs:
        if "\r" in value or "\n" in value:
            raise MailFormatError(f"header {name} contains a line break")
    return b"".join(f"{name}: {value}".encode("ascii") + CRLF for name, value in pairs)


def _set_headers(header: MailHeader, boundary: str) -> list[tuple[str, str]]:
    return [
        ("Content-Type", f'multipart/mixed; boundary="{boundary}"'),
        (H_STUDY, header.study_uid),
        (H_SET, header.set_id),
        (H_PART, str(header.part)),
        (H_TOTAL, str(header.total)),
    ]


def build_inner(header: MailHeader, parts: list[bytes]) -> bytes:
    """The signed content: multipart/mixed of application/dicom parts with the set headers."""
    boundary = "dcm-" + secrets.token_hex(16)
    out = [
        _header_lines(_set_headers(header, boundary)),
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


def build_inner_zip(header: MailHeader, archive: bytes) -> bytes:
    """The signed content of a DICOM-ZIP mail (PS3.11 Annex L): one application/zip part named DICOM.ZIP."""
    boundary = "zip-" + secrets.token_hex(16)
    return b"".join(
        [
            _header_lines(_set_headers(header, boundary)),
            CRLF,
            b"This is a DICOM-ZIP e-mail (DICOM PS3.11 Annex L)." + CRLF,
            CRLF + f"--{boundary}".encode() + CRLF,
            _header_lines(
                [
                    ("Content-Type", 'application/zip; id="DICOM.ZIP"; name="DICOM.ZIP"'),
                    ("Content-Transfer-Encoding", "base64"),
                    ("Content-Disposition", 'attachment; filename="DICOM.ZIP"'),
                ]
            ),
            CRLF,
            b64_lines(archive),
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


def wrap_smime(header: MailHeader, inner: bytes, signer: Identity, recipient_cert: x509.Certificate) -> bytes:
    """`inner` signed by `signer` and encrypted for the recipient (PS3.15 B.8), with the outer headers."""
    signed = build_signed(inner, signer)
    enveloped = smime.encrypt(signed, [recipient_cert])
    del signed  # large mails: hold as few copies at once as possible
    outer = _header_lines(
        [
            *outer_headers(header),
            ("Content-Type", 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'),
            ("Content-Transfer-Encoding", "base64"),
            ("Content-Disposition", 'attachment; filename="smime.p7m"'),
        ]
    )
    return b64_lines(enveloped, prefix=outer + CRLF)


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
    msg = _parse_head(raw)
    return OuterInfo(
        message_id=message_id_or_empty(_header(msg, "Message-ID")),
        sender=address_or_empty(_header(msg, "From")),
        set_id=_safe_id(_header(msg, H_SET)),
        part=_int_or_none(_header(msg, H_PART)),
        total=_int_or_none(_header(msg, H_TOTAL)),
        content_type=_content_type(msg),
        notify=address_or_empty(_header(msg, "Disposition-Notification-To")),
        subject=(_header(msg, "Subject") or "").strip()[:200],
    )


def _end_of_head(entity: bytes) -> int:
    """Where the body starts: after the first blank line, whatever the line ends."""
    found = [
        (i, sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := entity.find(sep, 0, MAX_HEADER_BYTES + 4)) >= 0
    ]
    if not found:
        raise MailFormatError("no end of headers within the size limit (headers too large or missing body)")
    idx, sep = min(found)
    return idx + len(sep)


def _parse_head(entity: bytes) -> Message:
    """The headers only, parsed; the body is not copied (a mail of 27 MB costs what its headers cost)."""
    return email.message_from_bytes(entity[: _end_of_head(entity)], policy=email.policy.compat32)


def _split_entity(entity: bytes) -> tuple[Message, bytes]:
    """Headers parsed, body as raw bytes (a copy of it)."""
    end = _end_of_head(entity)
    return email.message_from_bytes(entity[:end], policy=email.policy.compat32), entity[end:]


_FOLD = re.compile(r"\r?\n(?=[ \t])")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_MESSAGE_ID = re.compile(r"^<[!-;=?-~]{1,246}>$")  # RFC 5322 msg-id: printable ASCII, no space, no <>


def _header(msg: Message, name: str) -> str | None:
    """A header as text, unfolded (RFC 5322 §2.2.3) and with control characters removed, or None. compat32 keeps
    the folding CRLF in the value; a value from outside must never carry a line break into anything we build."""
    value = msg.get(name)
    if value is None:
        return None
    return _CONTROL.sub("", _FOLD.sub("", str(value)))


def message_id_or_empty(value: str | None) -> str:
    """A syntactically valid Message-ID (`<…>`, printable ASCII, at most 248 characters), or "" for anything
    else: a Message-ID from outside ends up in receipts and the catalog, so it is checked before any use."""
    value = (value or "").strip()
    return value if _MESSAGE_ID.match(value) else ""


def address_or_empty(value: str | None) -> str:
    """The mail address of a From:/To:-like header value, lower-case, or "" when it is not a plain address."""
    addr = parseaddr(value or "")[1].lower()
    return addr if re.fullmatch(r"[!-~]{1,254}", addr) and addr.count("@") == 1 else ""


def _content_type(msg: Message) -> str:
    return msg.get_content_type().lower()


def _multipart_bodies(body: bytes, boundary: str) -> list[bytes]:
    """The raw body parts of a multipart body, in order (RFC 2046 §5.1.1; preamble and epilogue dropped).

    Delimiters are found with `bytes.find` (a handful of calls per mail), not line by line: the stdlib parser
    spends seconds and hundreds of MB on a 20 MB mail. A missing close delimiter ends the last part at the end.
    """
    delim = b"--" + boundary.encode("ascii", "replace")
    positions: list[int] = []
    end_of_last = len(body)
    start = 0
    while True:
        i = body.find(delim, start)
        if i < 0:
            break
        start = i + len(delim)
        follows = body[start : start + 1]
        if (i == 0 or body[i - 1 : i] == b"\n") and follows in (b"", b"-", b"\r", b"\n", b" ", b"\t"):
            if body[start : start + 2] == b"--":
                end_of_last = i
                break
            positions.append(i)

    def part(a: int, b: int, at_delimiter: bool) -> bytes:
        line_end = body.find(b"\n", a)
        begin = len(body) if line_end < 0 else line_end + 1
        end = b
        if at_delimiter:  # the line break before the next delimiter belongs to the delimiter
            end = b - 1 if body[b - 1 : b] == b"\n" else b
            if end > begin and body[end - 1 : end] == b"\r":
                end -= 1
        return body[begin : max(begin, end)]

    bounds = [*positions, end_of_last]
    return [
        part(bounds[k], bounds[k + 1], k + 1 < len(positions) or end_of_last < len(body))
        for k in range(len(positions))
    ]


def _signed_parts(body: bytes, boundary: str) -> tuple[bytes, bytes]:
    """The raw first part (what was signed) and the raw second part of a multipart/signed body."""
    parts = _multipart_bodies(body, boundary)
    if len(parts) < 2:
        raise MailFormatError("multipart/signed without two parts")
    return parts[0], parts[1]


def _leaves(entity: bytes) -> tuple[Message, list[tuple[Message, bytes]]]:
    """The entity's own headers and every non-multipart part (headers, raw body), within MAX_DEPTH/MAX_PARTS."""
    count = 0
    top = Message()

    def walk(data: bytes, depth: int) -> list[tuple[Message, bytes]]:
        nonlocal count, top
        count += 1
        if depth > MAX_DEPTH:
            raise MailFormatError(f"MIME nesting deeper than {MAX_DEPTH} levels")
        if count > MAX_PARTS:
            raise MailFormatError(f"more than {MAX_PARTS} MIME parts")
        if data.startswith((b"\r\n", b"\n")):  # a part without headers: text/plain by default
            msg, body = Message(), data[2 if data.startswith(b"\r\n") else 1 :]
        elif depth > 1 and len(data) <= MAX_HEADER_BYTES and b"\n\n" not in data and b"\r\n\r\n" not in data:
            msg, body = _split_entity(data + b"\r\n\r\n")  # a part of headers only: its body is empty
        else:
            msg, body = _split_entity(data)
        if depth == 1:
            top = msg
        if msg.get_content_maintype() != "multipart":
            return [(msg, body)]
        boundary = msg.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise MailFormatError("a multipart part without a boundary")
        return [leaf for part in _multipart_bodies(body, boundary) for leaf in walk(part, depth + 1)]

    leaves = walk(entity, 1)
    return top, leaves


def _decoded(msg: Message, body: bytes) -> bytes:
    """A leaf's content with its transfer encoding undone."""
    encoding = (_header(msg, "Content-Transfer-Encoding") or "7bit").strip().lower()
    if encoding == "base64":
        try:
            return b64_decode(body)
        except binascii.Error:
            pass
        try:  # what other senders produce is not always clean: decode it the lenient way, as MIME readers do
            return binascii.a2b_base64(body)
        except binascii.Error:
            raise MailFormatError("invalid base64 in a part") from None
    if encoding == "quoted-printable":
        return quopri.decodestring(body)
    return body


def _decode_b64(data: bytes) -> bytes:
    try:
        return b64_decode(data)  # strict: anything outside the alphabet is an error
    except (binascii.Error, ValueError, TypeError):
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


def unwrap_smime(raw: bytes, me: Identity, trusted: list[x509.Certificate]) -> tuple[x509.Certificate, bytes]:
    """Decrypt an S/MIME enveloped mail with `me` and verify its signature; (signer, signed content)."""
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
    return _unwrap_signature(decrypted, trusted)


def unwrap_signed(entity: bytes, trusted: list[x509.Certificate]) -> tuple[x509.Certificate, bytes]:
    """Verify a signed (not encrypted) entity, as receipts come; (signer, signed content)."""
    return _unwrap_signature(entity, trusted)


def read_payload(content: bytes, signer: object, max_unpacked: int = 1024**3) -> OpenedMail:
    """The DICOM instances of a verified entity: application/dicom parts or a DICOM-ZIP archive.

    One file per mail (a single application/dicom entity, as some @GIT senders do) is accepted too.
    """
    from gateway.core import dicomzip

    inner, leaves = _leaves(content)
    parts: list[bytes] = []
    ignored = 0
    for leaf, body in leaves:
        ctype = _content_type(leaf)
        disposition = (_header(leaf, "Content-Disposition") or "").lower()
        name = str(leaf.get_param("name") or leaf.get_filename() or "").upper()
        if ctype == "application/dicom":
            payload = _decoded(leaf, body)
            if not payload:
                raise MailFormatError("an application/dicom part is empty or undecodable")
            parts.append(payload)
        elif ctype in ("application/zip", "application/x-zip-compressed") or (
            ctype == "application/octet-stream" and name == dicomzip.ZIP_NAME
        ):
            archive = _decoded(leaf, body)
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
        set_id=_safe_id(_header(inner, H_SET)),
        part=_int_or_none(_header(inner, H_PART)),
        total=_int_or_none(_header(inner, H_TOTAL)),
        study_uid=(_header(inner, H_STUDY) or "").strip()[:64] or None,
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
