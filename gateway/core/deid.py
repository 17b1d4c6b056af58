"""De-identification for partners that must not know who the patient is: DICOM PS3.15 Annex E, Basic Application
Level Confidentiality Profile, with the options a partner is configured with.

The table of what to do with each attribute (Table E.1-1: D dummy, Z empty, X remove, U replace UID, and the
combined actions) is Kitware's `dicom-anonymizer` copy of the current standard (2026c); the actions are ours,
because two things must hold that a generic anonymizer does not promise:

- **UIDs are replaced consistently and can be matched back**: a UID becomes `2.25.<128 bits of HMAC-SHA-256(key,
  partner, UID)>`, so every instance of a study gets the same new Study Instance UID, references between instances
  stay intact, and the same original always maps to the same replacement for the same partner (different partners
  get unrelated UIDs). The key stays at the sender (in its catalog): the partner cannot reverse the mapping, the
  sender can (`uid_for`) and does when a result comes back.
- **The patient gets a pseudonym, not a blank**: Patient Name and Patient ID become `DMG-` + 12 hex digits of the
  keyed hash of the original Patient ID, so a partner sees the studies of one patient as one patient (no more).

Combined actions take the conservative reading that keeps the instance valid: X/Z and X/Z/D empty, X/D a dummy,
X/Z/U* a replaced UID or empty. Private attributes are removed (no Retain Safe Private option). Pixel data is not
touched: instances with Burned In Annotation (0028,0301) YES are not sent to such a partner unless it is
configured to take them (`gateway.config.partners`: an exclusion routing and `resend` apply). The result carries
Patient Identity Removed YES, De-identification Method and its Code Sequence (CID 7050) naming the options used.

Pure: `deidentify` changes a dataset in place; the key and the partner come in.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from gateway.core.coerce import record_original

TABLE_VERSION = "dicomfields_2026c"

OPTIONS = {  # option → (CID 7050 code, meaning)
    "retain_longitudinal_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
}
BASIC = ("113100", "Basic Application Confidentiality Profile")

_KEEP = {  # what each option keeps of what the basic profile would change (PS3.15 Table E.1-1's option columns)
    "retain_patient_characteristics": (
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "EthnicGroup",
        "SmokingStatus",
        "PregnancyStatus",
        "PatientSexNeutered",
        "PatientSpeciesDescription",
    ),
    "retain_device_identity": (
        "DeviceSerialNumber",
        "DeviceUID",
        "StationName",
        "DetectorID",
        "GantryID",
        "PlateID",
        "CassetteID",
        "GeneratorID",
        "DeviceLabel",
        "DeviceDescription",
        "SourceSerialNumber",
        "PerformedStationAETitle",
        "ScheduledStationAETitle",
    ),
    "retain_institution_identity": (
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "InstitutionCodeSequence",
        "InstitutionalDepartmentTypeCodeSequence",
    ),
    "clean_descriptors": (
        "StudyDescription",
        "SeriesDescription",
        "ProtocolName",
        "ImageComments",
        "PerformedProcedureStepDescription",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepDescription",
        "AcquisitionComments",
        "DerivationDescription",
        "ContrastBolusAgent",
    ),
}
_DESCRIPTOR_VRS = ("LO", "SH", "ST", "LT", "UT")
_NEVER_KEPT_DATES = {
    Tag(k) for k in ("PatientBirthDate", "PatientBirthTime", "PatientBirthDateInAlternativeCalendar")
}


def _table() -> dict[BaseTag, str]:
    tags = dicom_anonymization_database_selector(TABLE_VERSION)
    action: dict[BaseTag, str] = {}
    for group, name in (
        ("X_TAGS", "X"),
        ("Z_TAGS", "Z"),
        ("D_TAGS", "D"),
        ("U_TAGS", "U"),
        ("Z_D_TAGS", "Z"),
        ("X_Z_TAGS", "Z"),
        ("X_D_TAGS", "D"),
        ("X_Z_D_TAGS", "Z"),
        ("X_Z_U_STAR_TAGS", "ZU"),
    ):
        for t in tags[group]:
            if (
                len(t) == 2
            ):  # exact tags; the table's few masked ranges (curves, overlays' data) are removed below
                action[Tag(t[0], t[1])] = name
    return action


ACTIONS = _table()
_REPEATING_GROUPS = (0x5000, 0x6000)  # curves and overlays (burnt-in text may hide there): removed whole


@dataclass(frozen=True)
class DeidSettings:
    """A partner's `deidentify` table."""

    options: frozenset[str] = frozenset()
    allow_burned_in: bool = False


def uid_for(key: bytes, partner: str, uid: str) -> str:
    """The replacement of `uid` for `partner`: the same every time, unrelated between partners, irreversible
    without the key (a 2.25 UID from 128 bits of the keyed hash, at most 44 characters)."""
    digest = hmac.new(key, f"uid\0{partner}\0{uid}".encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def pseudonym(key: bytes, partner: str, patient_id: str) -> str:
    """The patient's name and ID for `partner`: one per patient (and partner), not reversible without the key."""
    return (
        "DMG-"
        + hmac.new(key, f"patient\0{partner}\0{patient_id}".encode(), hashlib.sha256).hexdigest()[:12].upper()
    )


def _dummy(elem: DataElement) -> object:
    return {
        "DA": "19000101",
        "TM": "000000",
        "DT": "19000101000000",
        "PN": "ANONYMOUS",
        "UI": "",
        "AS": "000Y",
        "DS": "0",
        "IS": "0",
        "SQ": Sequence(),
        "US": 0,
        "SS": 0,
        "UL": 0,
        "SL": 0,
        "FL": 0.0,
        "FD": 0.0,
    }.get(elem.VR, "ANONYMIZED"[: 16 if elem.VR in ("SH", "AE", "CS") else 64])


def _scrub(text: str, identifiers: Iterable[str]) -> str:
    for ident in identifiers:
        if len(ident) >= 3:
            text = re.sub(re.escape(ident), "*", text, flags=re.IGNORECASE)
    return text


def _apply_table(
    d: Dataset,
    key: bytes,
    partner: str,
    keep: set[BaseTag],
    dates: bool,
    identifiers: list[str],
    options: frozenset[str],
) -> None:
    """Table E.1-1's action for every attribute of `d` and of its sequences' items."""
    for tag in list(d.keys()):
        elem = d[tag]
        if (tag.group & 0xFF00) in _REPEATING_GROUPS:
            del d[tag]
            continue
        action = ACTIONS.get(tag)
        if tag in keep:
            if "clean_descriptors" in options and elem.VR in _DESCRIPTOR_VRS and isinstance(elem.value, str):
                elem.value = _scrub(elem.value, identifiers)
        elif dates and elem.VR in ("DA", "DT", "TM") and action is not None and tag not in _NEVER_KEPT_DATES:
            pass  # Retain Longitudinal Temporal Information, Full Dates: the study's dates, never the patient's
        elif action == "X":
            del d[tag]
            continue
        elif action == "U" or (action == "ZU" and elem.VR == "UI"):
            if elem.value:
                if isinstance(elem.value, MultiValue | list):
                    elem.value = [uid_for(key, partner, str(v)) for v in elem.value]
                else:
                    elem.value = uid_for(key, partner, str(elem.value))
        elif action in ("Z", "ZU"):
            elem.value = Sequence() if elem.VR == "SQ" else None
        elif action == "D":
            elem.value = _dummy(elem)
        if elem.VR == "SQ" and tag in d:
            for item in d[tag].value or []:
                _apply_table(item, key, partner, keep, dates, identifiers, options)


def deidentify(ds: Dataset, key: bytes, partner: str, settings: DeidSettings) -> None:
    """De-identify a whole instance (file meta included) in place for `partner`."""
    keep = {Tag(k) for opt in settings.options for k in _KEEP.get(opt, ())}
    dates = "retain_longitudinal_dates" in settings.options
    original_id = str(ds.get("PatientID", "") or "")
    name = str(ds.get("PatientName", "") or "")
    identifiers = [p for p in re.split(r"[\^= ]+", name) if p] + [
        original_id,
        str(ds.get("PatientBirthDate", "") or ""),
    ]
    alias = pseudonym(key, partner, original_id)
    ds.remove_private_tags()

    _apply_table(ds, key, partner, keep, dates, identifiers, settings.options)
    ds.PatientName = alias
    ds.PatientID = alias
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    used = [BASIC] + [OPTIONS[o] for o in sorted(settings.options)]
    ds.DeidentificationMethod = "; ".join(m for _, m in used)[:64]
    codes = []
    for value, meaning in used:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)


def deidentify_file(src: str, dst: str, key_hex: str, partner: str, options: tuple[str, ...]) -> int:
    """Worker-process entry: the stored instance `src` de-identified into `dst`; returns its size."""
    ds = dcmread(src)
    deidentify(ds, bytes.fromhex(key_hex), partner, DeidSettings(frozenset(options)))
    ds.save_as(dst, enforce_file_format=True)
    return os.path.getsize(dst)


PATIENT_MODULE = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")


@dataclass(frozen=True)
class Reidentification:
    """What turns a partner's result on a de-identified study back into ours: replacement → original UID, and the
    patient module of the original study (read from one of its instances here)."""

    uids: dict[str, str]
    patient: dict[str, str]
    source: str  # the partner
    system: str  # this gateway


def reidentify(ds: Dataset, r: Reidentification, now: datetime.datetime) -> None:
    """Map every UID we replaced back to the original, restore the patient, and record what was there in Original
    Attributes Sequence (reason COERCE), in place. UIDs the partner made itself (its report's own) stay."""
    before = Dataset()
    for keyword in (*PATIENT_MODULE, "StudyInstanceUID"):
        if keyword in ds:
            before[keyword] = copy.deepcopy(ds[keyword])

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "UI" and elem.value:
                if isinstance(elem.value, MultiValue | list):
                    elem.value = [r.uids.get(str(v), str(v)) for v in elem.value]
                else:
                    elem.value = r.uids.get(str(elem.value), str(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value or []:
                    walk(item)

    walk(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in PATIENT_MODULE:
        if r.patient.get(keyword):
            setattr(ds, keyword, r.patient[keyword])
        elif keyword in ds:
            del ds[keyword]
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if keyword in ds:
            del ds[keyword]
    record_original(ds, before, now, r.system, r.source)
