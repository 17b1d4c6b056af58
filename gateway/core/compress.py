"""Compression for transfer, per partner: JPEG 2000 Lossless or the DICOM Deflated transfer syntax.

Pure functions over Part 10 bytes (they run in worker processes, see `stages.package`):

- `jpeg2000-lossless`: native (uncompressed) pixel data is re-encoded as JPEG 2000 Lossless
  (1.2.840.10008.1.2.4.90, OpenJPEG via pylibjpeg-openjpeg, reversible 5-3 wavelet). Decoding gives exactly the
  original pixel values. SOP Instance UID and every other attribute stay as they were.
- `deflate`: an Explicit/Implicit VR Little Endian instance becomes Deflated Explicit VR Little Endian
  (1.2.840.10008.1.2.1.99). The receiving gateway stores what the mail carried; its forwarding inflates for a PACS
  that does not accept Deflated (`stages.forward.as_native`).

Instances that are already compressed (encapsulated), lossy, big endian, without pixel data (for JPEG 2000) or of a
shape JPEG 2000 cannot carry losslessly pass unchanged: `transcode` returns None for them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

MODES = ("none", "deflate", "jpeg2000-lossless")
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_J2K_PHOTOMETRIC = {1: ("MONOCHROME1", "MONOCHROME2"), 3: ("RGB",)}


@dataclass(frozen=True)
class Transcoded:
    """One instance after compression for transfer."""

    data: bytes
    transfer_syntax: str


def _write(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _j2k_ok(ds: Dataset) -> bool:
    if "PixelData" not in ds or ds.get("FloatPixelData") is not None:
        return False
    spp = int(ds.get("SamplesPerPixel", 1))
    if str(ds.get("PhotometricInterpretation", "")) not in _J2K_PHOTOMETRIC.get(spp, ()):
        return False
    if int(ds.get("BitsAllocated", 0)) not in (8, 16) or not 1 <= int(ds.get("BitsStored", 0)) <= 16:
        return False
    return not (spp == 3 and int(ds.get("PlanarConfiguration", 0)) != 0)


def transcode(data: bytes, mode: str) -> Transcoded | None:
    """The instance compressed for transfer, or None when it passes unchanged."""
    if mode == "none":
        return None
    ds = pydicom.dcmread(io.BytesIO(data))
    if ds.file_meta.get("TransferSyntaxUID") not in _NATIVE:
        return None
    if mode == "deflate":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        return Transcoded(_write(ds), DeflatedExplicitVRLittleEndian)
    if mode != "jpeg2000-lossless":
        raise ValueError(f"unknown compression {mode!r}")
    if not _j2k_ok(ds):
        return None
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False, use_mct=False)
    return Transcoded(_write(ds), JPEG2000Lossless)


def transcode_file(src: str, dst: str, mode: str) -> tuple[int, int, str | None]:
    """Worker-process entry: compress `src` into `dst` when it gains; (bytes before, after, new syntax or None)."""
    with open(src, "rb") as f:
        data = f.read()
    try:
        result = transcode(data, mode)
    except Exception:
        result = None  # an instance the codec cannot handle goes as it is: never fail a transfer for it
    if result is None or len(result.data) >= len(data):
        return len(data), len(data), None
    with open(dst, "wb") as f:
        f.write(result.data)
    return len(data), len(result.data), result.transfer_syntax
