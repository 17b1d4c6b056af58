"""The DICOM upper layer and DIMSE as the SCP speaks them: PDU and command-set encoding, the file meta header, and
the constants of what is accepted. Pure (bytes in, bytes out); the association loop (`association.py`) uses it."""

from __future__ import annotations

import logging
import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom._globals import ALL_TRANSFER_SYNTAXES

log = logging.getLogger(__name__)


UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]

# The first of *our* syntaxes that the modality proposed is accepted. Compressed ones first, then explicit
# before implicit, so a modality that offers what its file holds gets it accepted as-is: no conversion anywhere.
ACCEPTED_TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in UNCOMPRESSED] + UNCOMPRESSED

VERIFICATION = "1.2.840.10008.1.1"

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# the same implementation identity as pynetdicom's SCU and the file meta it writes
IMPLEMENTATION_UID = PYNETDICOM_IMPLEMENTATION_UID

IMPLEMENTATION_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION

STATUS_SUCCESS = 0x0000

STATUS_OUT_OF_RESOURCES = 0xA700

STATUS_CANNOT_UNDERSTAND = 0xC210

STATUS_PROCESSING_FAILURE = 0x0110

# What we announce as our largest PDU (the modality sends at most this much at a time; DCMTK's default is 16 KiB)
MAX_PDU_RECEIVED = 4 * 1024 * 1024

MAX_ASSOCIATE_RQ = 256 * 1024  # a request with every storage class and every transfer syntax is about 60 KB

P_DATA, ASSOC_RQ, RELEASE_RQ, ABORT = 0x04, 0x01, 0x05, 0x07

RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol: the association is aborted (A-P-ABORT with `reason`)."""

    def __init__(self, why: str, reason: int = 0x02) -> None:
        super().__init__(why)
        self.reason = reason


def parse_command(data: bytes) -> dict[int, bytes]:
    """The elements of a command set (group 0000, Implicit VR Little Endian) by element number."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise ProtocolError("command set cut short", 0x06)
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or length > end - pos:
            raise ProtocolError("malformed command set", 0x06)
        out[element] = data[pos : pos + length]
        pos += length
    return out


def command_us(cmd: dict[int, bytes], element: int) -> int:
    value = cmd.get(element, b"")
    if len(value) != 2:
        raise ProtocolError(f"command element (0000,{element:04X}) missing or not US", 0x06)
    return int(struct.unpack("<H", value)[0])


def command_ui(cmd: dict[int, bytes], element: int) -> str:
    return cmd.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def response_command(
    command_field: int,
    message_id: int,
    sop_class: str,
    status: int,
    sop_instance: str,
    event_type: int | None = None,
) -> bytes:
    """A C-STORE-RSP / C-ECHO-RSP / N-EVENT-REPORT-RSP command set (no dataset follows)."""
    body = _element(0x0002, _uid_value(sop_class))
    body += _element(0x0100, struct.pack("<H", command_field))
    body += _element(0x0120, struct.pack("<H", message_id))
    body += _element(0x0800, struct.pack("<H", 0x0101))
    body += _element(0x0900, struct.pack("<H", status))
    if sop_instance:
        body += _element(0x1000, _uid_value(sop_instance))
    if event_type is not None:
        body += _element(0x1002, struct.pack("<H", event_type))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, tag, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (Explicit VR Little Endian), as pydicom writes it
    for pynetdicom's `create_file_meta` (a test compares the two); by hand because this runs for every instance."""
    version = IMPLEMENTATION_VERSION.encode("ascii")
    body = (
        _meta_element(0x0001, b"OB", b"\x00\x01")
        + _meta_element(0x0002, b"UI", _uid_value(sop_class))
        + _meta_element(0x0003, b"UI", _uid_value(sop_instance))
        + _meta_element(0x0010, b"UI", _uid_value(transfer_syntax))
        + _meta_element(0x0012, b"UI", _uid_value(IMPLEMENTATION_UID))
        + _meta_element(0x0013, b"SH", version + b" " if len(version) % 2 else version)
    )
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU holding a whole command set as its last fragment."""
    pdv = bytes([context_id, 0x03]) + command
    return struct.pack(">BBII", P_DATA, 0, len(pdv) + 4, len(pdv)) + pdv


def a_abort(source: int, reason: int) -> bytes:
    """An A-ABORT PDU (source 0 = service user, 2 = service provider)."""
    return struct.pack(">BBIBBBB", ABORT, 0, 4, 0, 0, source, reason)
