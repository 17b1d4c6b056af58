"""DICOM-ZIP (PS3.11 Annex L): a File-set with its DICOMDIR in one ZIP archive, built and unpacked safely.

Building: the DICOMDIR is made by pydicom's `FileSet` from the instances' headers only (pixel data is never
loaded); the archive then holds the DICOMDIR and every instance's original bytes under the File IDs the DICOMDIR
names (PS3.10 File IDs: up to 8 components of up to 8 characters, `PT000000/ST000000/SE000000/IM000000`).

Unpacking is defensive: no names with `..`, no absolute or drive names, no symlinks, at most `MAX_ENTRIES`
entries; sizes are counted while inflating (the declared sizes of a hostile archive are not trusted) against a
total limit and a per-entry ratio limit; a DICOMDIR whose records point to files outside the archive, or to
names that are not in it, refuses the archive. Without a DICOMDIR (a partner's error) every entry that is DICOM is
read (PS3.11 G.2.1.2). Nothing is written to disk: entries are returned as bytes to the same gate as mail parts.
"""

from __future__ import annotations

import io
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import pydicom
from pydicom.fileset import FileSet

MAX_ENTRIES = 10_000
MAX_RATIO = 1100  # deflate cannot exceed ~1032:1; more means overlapping or nested tricks
ZIP_NAME = "DICOM.ZIP"
_RECORD_KEYS = (
    ("PatientID", "UNKNOWN"),
    ("PatientName", ""),
    ("StudyDate", "19000101"),  # type 1 in the STUDY record; only the DICOMDIR carries the placeholder
    ("StudyTime", "000000"),
    ("StudyID", "1"),
    ("AccessionNumber", ""),
    ("StudyDescription", ""),
    ("Modality", "OT"),
    ("SeriesNumber", 1),
    ("InstanceNumber", 1),
)


class ZipRefused(ValueError):
    """The archive must not be unpacked; the message says why (never patient data)."""


def build_zip(files: list[bytes], *, deflate: bool) -> bytes:
    """A DICOM-ZIP of these Part 10 instances (original bytes), with a DICOMDIR."""
    fs = FileSet()
    index: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="dmg-zip-") as tmp:
        for i, data in enumerate(files):
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            # the directory records need these keys; an instance without them still belongs in the archive
            for keyword, default in _RECORD_KEYS:
                if ds.get(keyword) in (None, ""):
                    setattr(ds, keyword, default)
            index[str(ds.SOPInstanceUID)] = i
            fs.add(ds)
        fs.write(tmp, use_existing=False)
        names: dict[int, str] = {}
        for inst in fs:
            uid = str(inst.ReferencedSOPInstanceUIDInFile)
            names[index[uid]] = "/".join(Path(inst.path).relative_to(tmp).parts)
        dicomdir = (Path(tmp) / "DICOMDIR").read_bytes()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method, compresslevel=6 if deflate else None) as zf:
        zf.writestr("DICOMDIR", dicomdir)
        for i, data in enumerate(files):
            zf.writestr(names[i], data)
    return buf.getvalue()


def _safe_name(name: str) -> str:
    # entry names are never quoted in a reason: DICOM-ZIP senders often name files after the patient
    if not name or "\\" in name or "\x00" in name or ":" in name:
        raise ZipRefused("archive entry with an unsafe name (drive, backslash or NUL)")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ZipRefused("archive entry with an unsafe name (absolute or '..')")
    return str(path)


def read_zip(data: bytes, max_total: int) -> list[bytes]:
    """The DICOM instances of a DICOM-ZIP (as the DICOMDIR lists them, or every DICOM entry); or `ZipRefused`."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise ZipRefused(f"not a readable ZIP archive ({type(exc).__name__})") from None
    if len(infos) > MAX_ENTRIES:
        raise ZipRefused(f"archive has more than {MAX_ENTRIES} entries")
    entries: dict[str, bytes] = {}
    total = 0
    for number, info in enumerate(infos, start=1):
        name = _safe_name(info.filename)
        if info.is_dir():
            continue
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ZipRefused(f"archive entry {number} is a symbolic link")
        if info.flag_bits & 0x1:
            raise ZipRefused("archive entry is encrypted (ZIP encryption is not used for DICOM-ZIP)")
        out = bytearray()
        try:
            with zf.open(info) as f:
                while chunk := f.read(1 << 20):
                    out += chunk
                    total += len(chunk)
                    if total > max_total:
                        raise ZipRefused(f"archive unpacks to more than {max_total} bytes (zip bomb?)")
                    if len(out) > 1 << 20 and len(out) > MAX_RATIO * max(info.compress_size, 1):
                        raise ZipRefused("archive entry expands more than deflate can (zip bomb?)")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError) as exc:
            raise ZipRefused(f"archive entry {number} is damaged ({type(exc).__name__})") from None
        except NotImplementedError:
            raise ZipRefused("archive entry uses an unsupported compression method") from None
        key = name.upper()
        if key in entries:
            raise ZipRefused(f"archive entry {number} repeats an earlier entry's name")
        entries[key] = bytes(out)
    dicomdir = entries.pop("DICOMDIR", None)
    if dicomdir is None:
        files = [b for b in entries.values() if len(b) > 132 and b[128:132] == b"DICM"]
        if not files:
            raise ZipRefused("archive has neither a DICOMDIR nor DICOM files")
        return files
    return [entries[name] for name in _dicomdir_files(dicomdir, entries)]


def _dicomdir_files(dicomdir: bytes, entries: dict[str, bytes]) -> list[str]:
    """The archive names the DICOMDIR references, each checked to exist and to stay inside the archive."""
    try:
        ds = pydicom.dcmread(io.BytesIO(dicomdir))
        records = list(ds.DirectoryRecordSequence)
    except Exception as exc:
        raise ZipRefused(f"DICOMDIR is not readable: {type(exc).__name__}") from None
    names: list[str] = []
    for record in records:
        ref = record.get("ReferencedFileID")
        if ref is None:
            continue
        parts = [str(p) for p in ref] if isinstance(ref, pydicom.multival.MultiValue) else [str(ref)]
        if any(not p or p in (".", "..") or "/" in p or "\\" in p for p in parts):
            raise ZipRefused("DICOMDIR references a file outside the archive")
        name = _safe_name("/".join(parts)).upper()
        if name not in entries:
            raise ZipRefused("DICOMDIR references a file that is not in the archive")
        names.append(name)
    if not names:
        raise ZipRefused("DICOMDIR lists no files")
    return names
