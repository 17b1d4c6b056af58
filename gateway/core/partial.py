"""RFC 2046 §5.2.2 `message/partial`: one large mail cut into fragments, and put back together.

Cutting: the whole mail (its headers and body) is cut at line ends into pieces no larger than the cap; each
fragment is a small mail of its own, `Content-Type: message/partial; id="…"; number=i; total=n`, its subject with
` (i/n)` appended (as @GIT senders do). Fragments carry no signature of their own: the reassembled mail is the
signed and encrypted one, so a fragment altered in transit makes the whole mail fail verification.

Reassembly (§5.2.2.2): the bodies in number order; the enclosed headers come from the first fragment's body, the
outer headers of the first fragment fill what the enclosed ones lack (except Content-*, Subject, Message-ID,
Encrypted and MIME-Version). Pure: bytes in, bytes out.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from gateway.core.mime import (
    CRLF,
    MAX_HEADER_BYTES,
    MailFormatError,
    end_of_head,
    header,
    header_lines,
    parse_head,
)

_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
_NOT_FROM_OUTER = ("content-", "subject", "message-id", "encrypted", "mime-version")
MAX_FRAGMENTS = 10_000


@dataclass(frozen=True)
class Fragment:
    """The identity of one fragment (its body is the rest of the raw mail)."""

    id: str
    number: int
    total: int | None  # RFC 2046: only the last fragment must carry total


def is_partial(raw: bytes) -> bool:
    """True when the mail is a `message/partial` fragment (headers only are read)."""
    try:
        msg = parse_head(raw)
    except MailFormatError:
        return False
    return msg.get_content_type().lower() == "message/partial"


def read_fragment(raw: bytes) -> Fragment:
    """Identity of a fragment; `MailFormatError` when the parameters are missing or absurd."""
    msg = parse_head(raw)
    if msg.get_content_type().lower() != "message/partial":
        raise MailFormatError("not a message/partial fragment")
    frag_id = str(msg.get_param("id") or "")
    number = str(msg.get_param("number") or "")
    total = str(msg.get_param("total") or "")
    if not _ID_RE.match(frag_id):
        raise MailFormatError("message/partial without a usable id")
    if not number.isdigit() or not 1 <= int(number) <= MAX_FRAGMENTS:
        raise MailFormatError("message/partial with a bad number")
    if total and (not total.isdigit() or not int(number) <= int(total) <= MAX_FRAGMENTS):
        raise MailFormatError("message/partial with a bad total")
    return Fragment(frag_id, int(number), int(total) if total else None)


def fragment(
    mail: bytes, max_size: int, frag_id: str, headers: list[tuple[str, str]], subject: str
) -> list[bytes]:
    """Cut `mail` into fragments of at most `max_size` bytes each (including their own headers).

    `headers` are the outer headers every fragment carries (From, To, Date, …); each fragment gets its own
    Message-ID `<number.frag_id>` and the subject with ` (i/n)`.
    """
    if not _ID_RE.match(frag_id) or '"' in frag_id:
        raise ValueError("fragment id must be printable ASCII without quotes")
    overhead = len(header_lines(headers)) + len(subject) + 2 * len(frag_id) + 400
    room = max_size - overhead
    if room < 4096:
        raise MailFormatError("max mail size too small for message/partial fragments")
    pieces: list[bytes] = []
    start = 0
    while start < len(mail):
        end = min(len(mail), start + room)
        if end < len(mail):
            cut = mail.rfind(b"\n", start, end)
            if cut <= start:
                raise MailFormatError("a line of the mail is longer than one fragment")
            end = cut + 1
        pieces.append(mail[start:end])
        start = end
    total = len(pieces)
    out = []
    for number, piece in enumerate(pieces, start=1):
        own = [
            *headers,
            ("Subject", f"{subject} ({number}/{total})"),
            ("Message-ID", f"<{number}.{frag_id.strip('<>')}>"),
            ("MIME-Version", "1.0"),
            ("Content-Type", f'message/partial; id="{frag_id}"; number={number}; total={total}'),
        ]
        if not piece.endswith(b"\n"):
            piece += CRLF  # only the last piece can lack it; the mail's own last line break is restored so
        out.append(header_lines(own) + CRLF + piece)
    return out


def reassemble(fragments: dict[int, bytes]) -> bytes:
    """The enclosed mail from all fragments (number → raw fragment mail)."""
    if not fragments:
        raise MailFormatError("no fragments")
    total = max(fragments)
    if sorted(fragments) != list(range(1, total + 1)):
        raise MailFormatError("fragments missing")
    out = io.BytesIO()
    reassemble_into(total, fragments.__getitem__, out)
    return out.getvalue()


def reassemble_into(total: int, read: Callable[[int], bytes], out: BinaryIO) -> int:
    """`reassemble`, streamed: fragment `number` is read by `read(number)` one at a time and its body written to
    `out`, so memory holds one fragment, never the whole message. Returns the bytes written."""
    if total < 1:
        raise MailFormatError("no fragments")
    first = read(1)
    start = end_of_head(first)
    first_outer = parse_head(first)
    inner = parse_head(first[start : start + MAX_HEADER_BYTES + 4])
    extra = [
        (name, str(value))
        for name, value in first_outer.items()
        if not name.lower().startswith(_NOT_FROM_OUTER) and inner.get(name) is None
    ]
    extra = [
        (n, v) for n, v in extra if "\r" not in v and "\n" not in v and header(first_outer, n) is not None
    ]
    written = 0
    if extra:
        head = header_lines(extra)
        out.write(head)
        written += len(head)
    out.write(memoryview(first)[start:])
    written += len(first) - start
    del first
    for number in range(2, total + 1):
        data = read(number)
        body = memoryview(data)[end_of_head(data) :]
        out.write(body)
        written += len(body)
    return written
