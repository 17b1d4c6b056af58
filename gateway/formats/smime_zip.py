"""`smime-zip`: the S/MIME envelope of `smime` around one DICOM-ZIP archive (PS3.11 Annex L, pydicom's FileSet
tree). The archive itself is deflated when the partner asks for `deflate`; it is opened by the same envelope."""

from __future__ import annotations

from typing import ClassVar

from gateway.core import dicomzip, mailformat
from gateway.core.mailformat import MailHeader
from gateway.formats.base import MailFormat, register
from gateway.formats.smime import SmimeFormat


class SmimeZipFormat(SmimeFormat):
    name: ClassVar[str] = "smime-zip"
    subject_tag: ClassVar[str] = "DICOM-ZIP"
    growth: ClassVar[float] = 1.01  # a zip entry costs its header and its DICOMDIR record
    own_compression: ClassVar[frozenset[str]] = frozenset({"deflate"})

    write = MailFormat.write  # the archive is built whole (its directory comes last), so the mail is too

    def content(self, header: MailHeader, parts: list[bytes], compression: str) -> bytes:
        archive = dicomzip.build_zip(parts, deflate=compression == "deflate")
        return mailformat.build_inner_zip(header, archive)


register(SmimeZipFormat())
