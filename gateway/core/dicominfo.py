"""Reading what the gateway needs from a DICOM Part 10 file: UIDs, SOP class, transfer syntax, modality.

Pure: bytes or a path in, an `InstanceInfo` out. Only identifiers of the *objects* are read (UIDs,
modality, series number); patient attributes are never read into memory here, so they cannot leak from here.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
]


class NotDicomError(ValueError):
    """The bytes are not a usable DICOM Part 10 instance; the message says why (no patient data)."""


@dataclass(frozen=True)
class InstanceInfo:
    """The identifiers of one SOP instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str
    series_number: int | None


def is_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def read_info(source: bytes | Path | BinaryIO) -> InstanceInfo:
    """Read the identifiers of a Part 10 file; raise `NotDicomError` if it is not one."""
    if isinstance(source, bytes):
        fp: BinaryIO = io.BytesIO(source)
    elif isinstance(source, Path):
        fp = source.open("rb")
    else:
        fp = source
    try:
        head = fp.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            raise NotDicomError("not a DICOM Part 10 file (no DICM preamble)")
        fp.seek(0)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_TAGS)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
            raise NotDicomError(f"unreadable DICOM header: {type(exc).__name__}") from None
        meta = ds.file_meta
        tsyntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
        values = {}
        for tag in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = str(ds.get(tag, "") or "").strip("\x00 ")
            if not is_uid(value):
                raise NotDicomError(f"{tag} missing or not a valid UID")
            values[tag] = value
        meta_sop = str(getattr(meta, "MediaStorageSOPInstanceUID", "") or "").strip("\x00 ")
        if meta_sop and meta_sop != values["SOPInstanceUID"]:
            raise NotDicomError("file meta MediaStorageSOPInstanceUID differs from SOPInstanceUID")
        if not is_uid(tsyntax):
            raise NotDicomError("file meta has no valid TransferSyntaxUID")
        series_number = ds.get("SeriesNumber")
        try:
            number = int(series_number) if series_number not in (None, "") else None
        except (TypeError, ValueError):
            number = None
        return InstanceInfo(
            sop_class_uid=values["SOPClassUID"],
            sop_instance_uid=values["SOPInstanceUID"],
            study_uid=values["StudyInstanceUID"],
            series_uid=values["SeriesInstanceUID"],
            transfer_syntax=tsyntax,
            modality=str(ds.get("Modality", "") or "")[:16],
            series_number=number,
        )
    finally:
        if isinstance(source, Path):
            fp.close()


def dataset_offset(data: bytes) -> int:
    """Offset of the first byte after the File Meta Information group (where the dataset begins)."""
    if data[128:132] != b"DICM":
        raise NotDicomError("not a DICOM Part 10 file")
    # (0002,0000) UL group length, explicit VR little endian: tag(4) VR(2) len(2) value(4)
    if data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        raise NotDicomError("file meta has no group length")
    group_len = int.from_bytes(data[140:144], "little")
    return 144 + group_len
