"""A DICOM S/MIME mail written while its parts are read (PS3.15 B.8): the same bytes `mailformat.wrap_smime`
makes of `mailformat.build_inner`, produced piece by piece so that neither the mail nor a part is ever whole in
memory. Pure: open files in, bytes out to a caller's sink.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from cryptography import x509

from gateway.core import cmsstream, mailformat, mime, smime
from gateway.core.mailformat import MailHeader
from gateway.core.smime import Identity


@dataclass(frozen=True)
class Written:
    """What writing one mail leaves beside its bytes: the digest of its signed content (`mdn.content_mic`), the
    SHA-256 (hex) of each DICOM part as it went in, and whether it can go after SMTP DATA as it is (CRLF
    throughout, no line starting with a dot)."""

    mic: str
    digests: list[str]
    wire_ready: bool


def write_smime(
    header: MailHeader,
    parts: Sequence[tuple[BinaryIO, int]],
    signer: Identity,
    recipient_cert: x509.Certificate,
    sink: Callable[[bytes], object],
) -> Written:
    """The mail `wrap_smime(build_inner(...))` makes, written to `sink` in pieces (`cmsstream.B64_PIECE`) while the
    parts (open files and their sizes) are read: each piece is base64-encoded, hashed for the signature, encrypted
    and base64-encoded again before the next is read, so no copy of the whole mail or of a part is ever held.
    The content is hashed once: its digest is both the signature's message digest and the receipt's MIC.

    Size: one pass over a mail in the order its bytes leave, with the length checks that keep the DER honest.
    """
    head, part_heads, tail = mailformat.inner_frame(header, len(parts))
    inner_len = len(head) + sum(len(h) + mime.b64_len(n) for h, (_, n) in zip(part_heads, parts, strict=True))
    inner_len += len(tail)
    sig_head, sig_middle, sig_tail = mailformat.signed_frame()
    now = dt.datetime.now(dt.UTC)
    sig_len = cmsstream.signature_length(signer, now)
    signed_len = len(sig_head) + inner_len + len(sig_middle) + mime.b64_len(sig_len) + len(sig_tail)
    sink(mailformat.smime_outer(header))
    lines = cmsstream.Base64Lines(sink)
    envelope = cmsstream.Envelope(recipient_cert, signed_len, lines.write)
    envelope.write(sig_head)
    content = hashlib.sha256()

    def signed(data: bytes) -> None:
        content.update(data)
        envelope.write(data)

    signed(head)
    digests = []
    for part_head, (source, size) in zip(part_heads, parts, strict=True):
        signed(part_head)
        digest, seen = hashlib.sha256(), 0
        while piece := source.read(cmsstream.B64_PIECE):
            digest.update(piece)
            seen += len(piece)
            signed(mime.b64_lines(piece))
        if seen != size:
            raise mime.MailFormatError(
                f"a DICOM part has {seen} bytes, not the {size} it had when the mail was planned"
            )
        digests.append(digest.hexdigest())
    signed(tail)
    signature = cmsstream.signed_data_detached(content.digest(), signer, now)
    if len(signature) != sig_len:
        raise smime.SmimeError(f"the signature came out {len(signature)} bytes long, not {sig_len}")
    envelope.write(sig_middle + mime.b64_lines(signature) + sig_tail)
    envelope.close()
    lines.close()
    return Written(base64.b64encode(content.digest()).decode("ascii"), digests, wire_ready=True)
