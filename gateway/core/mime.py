"""MIME as the gateway reads and writes it (RFC 2045/2046/5322): pure, bytes in, bytes out, with hard limits.

Public API for every format and reader: base64 in 76-character lines and strict decoding, header lines written
safely (no line break can be smuggled in), header sections and multipart bodies split with `bytes.find` rather
than the stdlib parser (a 20 MB mail costs what its headers cost), leaves of a MIME tree within `MAX_DEPTH` and
`MAX_PARTS`, and header values unfolded with control characters removed. Nothing here knows about DICOM.
"""

from __future__ import annotations

import binascii
import email
import email.policy
import quopri
import re
from email.message import Message
from email.utils import parseaddr

import numpy as np
import pybase64

CRLF = b"\r\n"


_B64_LINE = 76


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


def b64_lines(data: bytes | bytearray | memoryview, prefix: bytes = b"") -> bytes:
    """`prefix`, then `data` in base64 of 76-character lines with CRLF line ends (RFC 2045).

    One base64 pass over the whole input (pybase64: SIMD, about 20 times `binascii` here), then the line ends
    are laid in with one strided copy into the result, and no further copy of a large mail for its headers. The
    result is a bytearray (a bytes-like object every caller accepts), so it is not copied again.
    """
    encoded = pybase64.b64encode(data)
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


def wire_ready(data: bytes) -> bool:
    """True when `data` can go after SMTP DATA as it is: CRLF line ends only, ending with one, and no line that
    starts with a dot (it scans the whole message: call it where that costs nothing, where the mail is built)."""
    lf = data.count(b"\n")
    return (
        lf == data.count(b"\r\n") == data.count(b"\r")
        and data.endswith(b"\r\n")
        and not data.startswith(b".")
        and b"\n." not in data
    )


def b64_decode(data: bytes) -> bytes:
    """Strict base64 with line ends and blanks ignored; `binascii.Error` if anything else is off.

    Bodies in the layout every DICOM mail uses (76-character lines with CRLF) lose their line ends in one strided
    copy; anything else in one `translate`. pybase64 (SIMD) then decodes strictly. Padding is only allowed at the
    very end.
    """
    lined = _without_line_ends(data)
    clean = data.translate(None, b" \t\r\n") if lined is None else lined
    if len(clean) % 4:
        raise binascii.Error("base64 length is not a multiple of 4")
    if clean.find(b"=", 0, max(0, len(clean) - 2)) >= 0:
        raise binascii.Error("base64 padding before the end")
    return pybase64.b64decode(clean, validate=True)


def _without_line_ends(data: bytes) -> bytes | None:
    """`data` without its line ends when it is whole 76-character lines, each ending with CRLF, and then at most
    one shorter line (with or without its CRLF); None for any other layout (the caller removes blanks
    wherever they are)."""
    width = _B64_LINE + 2
    full = len(data) // width
    tail = data[full * width :]
    if tail.endswith(CRLF):
        tail = tail[:-2]
    if not full or b"\r" in tail or b"\n" in tail:
        return None
    lines = np.frombuffer(data, dtype=np.uint8, count=full * width).reshape(full, width)
    if not (lines[:, _B64_LINE] == 13).all() or not (lines[:, _B64_LINE + 1] == 10).all():
        return None
    out = bytearray(full * _B64_LINE + len(tail))
    np.frombuffer(out, dtype=np.uint8, count=full * _B64_LINE).reshape(full, _B64_LINE)[:] = lines[
        :, :_B64_LINE
    ]
    out[full * _B64_LINE :] = tail
    return out  # type: ignore[return-value]  # bytearray: bytes-like, used only for decoding


def crlf_only(data: bytes) -> bool:
    """True when every line end in `data` is CRLF (no bare LF): one vectorised pass instead of two counts."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if not len(arr):
        return True
    lf = np.flatnonzero(arr[1:] == 10) + 1
    return arr[0] != 10 and bool((arr[lf - 1] == 13).all())


def header_lines(pairs: list[tuple[str, str]]) -> bytes:
    for name, value in pairs:
        if "\r" in value or "\n" in value:
            raise MailFormatError(f"header {name} contains a line break")
    return b"".join(f"{name}: {value}".encode("ascii") + CRLF for name, value in pairs)


def end_of_head(entity: bytes) -> int:
    """Where the body starts: after the first blank line, whatever the line ends."""
    found = [
        (i, sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := entity.find(sep, 0, MAX_HEADER_BYTES + 4)) >= 0
    ]
    if not found:
        raise MailFormatError("no end of headers within the size limit (headers too large or missing body)")
    idx, sep = min(found)
    return idx + len(sep)


def parse_head(entity: bytes) -> Message:
    """The headers only, parsed; the body is not copied (a mail of 27 MB costs what its headers cost)."""
    return email.message_from_bytes(entity[: end_of_head(entity)], policy=email.policy.compat32)


def split_entity(entity: bytes) -> tuple[Message, bytes]:
    """Headers parsed, body as raw bytes (a copy of it)."""
    end = end_of_head(entity)
    return email.message_from_bytes(entity[:end], policy=email.policy.compat32), entity[end:]


_FOLD = re.compile(r"\r?\n(?=[ \t])")


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


_MESSAGE_ID = re.compile(r"^<[!-;=?-~]{1,246}>$")  # RFC 5322 msg-id: printable ASCII, no space, no <>


def header(msg: Message, name: str) -> str | None:
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


def content_type(msg: Message) -> str:
    return msg.get_content_type().lower()


def multipart_bodies(body: bytes, boundary: str) -> list[bytes]:
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


def signed_parts(body: bytes, boundary: str) -> tuple[bytes, bytes]:
    """The raw first part (what was signed) and the raw second part of a multipart/signed body."""
    parts = multipart_bodies(body, boundary)
    if len(parts) < 2:
        raise MailFormatError("multipart/signed without two parts")
    return parts[0], parts[1]


def leaves(entity: bytes) -> tuple[Message, list[tuple[Message, bytes]]]:
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
            msg, body = split_entity(data + b"\r\n\r\n")  # a part of headers only: its body is empty
        else:
            msg, body = split_entity(data)
        if depth == 1:
            top = msg
        if msg.get_content_maintype() != "multipart":
            return [(msg, body)]
        boundary = msg.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise MailFormatError("a multipart part without a boundary")
        return [leaf for part in multipart_bodies(body, boundary) for leaf in walk(part, depth + 1)]

    leaves = walk(entity, 1)
    return top, leaves


def decoded(msg: Message, body: bytes) -> bytes:
    """A leaf's content with its transfer encoding undone."""
    encoding = (header(msg, "Content-Transfer-Encoding") or "7bit").strip().lower()
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


def decode_b64_strict(data: bytes) -> bytes:
    try:
        return b64_decode(data)  # strict: anything outside the alphabet is an error
    except (binascii.Error, ValueError, TypeError):
        raise MailFormatError("invalid base64") from None


def canonical(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
