"""Logging for every process of the gateway (main, DICOM receivers, workers): plain lines to stderr, and no
patient data in them.

Our own lines carry ids and UIDs only. Libraries are another matter: pydicom's validation warnings quote element
values (`Invalid value for VR PN: 'DOE^JOHN'`), and Python prints warnings on stderr. Here every warning becomes
a log record (`logging.captureWarnings`), and records from libraries pass a filter that drops anything quoted
and any long run of text, keeping the library's words: "Invalid value for VR PN: <value removed>".
"""

from __future__ import annotations

import logging
import re
import sys

# quoted values ('…', "…", b'…') and "=value" / ": value" tails as pydicom and other libraries write them
_QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*"|`[^`]*`""")
_AFTER_COLON = re.compile(r"(:|=)\s*[^\s,;)]+(?:\^[^\s,;)]*)+")  # DICOM PN values: FAMILY^GIVEN
_OWN = ("gateway",)


def scrub(text: str) -> str:
    """A library's message without the values it quotes."""
    text = _QUOTED.sub("<value removed>", text)
    return _AFTER_COLON.sub(r"\1 <value removed>", text)[:500]


class ScrubLibraryRecords(logging.Filter):
    """Scrubs the message of every record not from the gateway's own loggers (pydicom, py.warnings, …)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_OWN):
            record.msg = scrub(record.getMessage())
            record.args = None
            record.exc_info = None  # a library's traceback may quote the value it choked on
            record.exc_text = None
        return True


def setup_logging(level: str) -> None:
    """Plain lines to stderr (journald/docker friendly). Records carry ids and UIDs only."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)  # warnings go through the handlers (and the filter), not straight to stderr
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubLibraryRecords) for f in handler.filters):
            handler.addFilter(ScrubLibraryRecords())
    from gateway.adapters.dicom import quiet_pynetdicom

    quiet_pynetdicom()
