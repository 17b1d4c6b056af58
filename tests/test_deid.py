"""De-identification (`gateway.core.deid`): PS3.15 Annex E basic profile with options, UIDs replaced consistently
with a key that stays here, pixels untouched (fast tier)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom

from gateway.core.deid import DeidSettings, deidentify, pseudonym, uid_for
from gateway.devtools.studies import make_study
from tests.conftest import CANARIES

KEY = b"k" * 32


def deid(path: Path, *options: str, partner: str = "research") -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.InstitutionName = "Klinikum Beispielstadt"
    ds.StationName = "CT-ROOM-2"
    ds.StudyDate, ds.AccessionNumber = "20261201", "ACC-4711"
    ds.StudyDescription = f"CT Kopf {ds.PatientName} nativ"
    ds.add_new(0x00091001, "LO", "private hospital note")
    ds.ReferencedSOPSequence = [pydicom.Dataset()]
    ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedSOPSequence[0].ReferencedSOPClassUID = ds.SOPClassUID
    deidentify(ds, KEY, partner, DeidSettings(frozenset(options)))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_the_basic_profile_leaves_no_patient_data_and_keeps_the_pixels(tmp_path: Path) -> None:
    paths = make_study(tmp_path / "s", ct=2, mr=1, sc=0, size=32)
    originals = [pydicom.dcmread(p) for p in paths]
    out = [deid(p) for p in paths]
    for o, d in zip(originals, out, strict=True):
        raw = io.BytesIO()
        d.save_as(raw, enforce_file_format=True)
        for canary in CANARIES:
            assert canary not in raw.getvalue(), canary
        assert d.PixelData == o.PixelData and d.SOPClassUID == o.SOPClassUID and d.Modality == o.Modality
        assert d.SOPInstanceUID == uid_for(KEY, "research", o.SOPInstanceUID) != o.SOPInstanceUID
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert d.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == d.SOPInstanceUID, "references follow"
        assert d.PatientID == d.PatientName == pseudonym(KEY, "research", o.PatientID)
        assert ("StudyDescription" not in d and "InstitutionName" not in d) or not d.InstitutionName
        assert not d.get("StationName") and 0x00091001 not in d, "device identity and private data gone"
        assert (
            d.PatientIdentityRemoved == "YES"
            and d.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        )
        assert not d.StudyDate and not d.AccessionNumber, "dates and accession emptied (Z)"
    # one study, its series, stay one study and the same series for the partner
    assert len({d.StudyInstanceUID for d in out}) == 1 and len({d.SeriesInstanceUID for d in out}) == 2
    # another partner gets unrelated UIDs and another pseudonym
    other = deid(paths[0], partner="second-opinion")
    assert other.StudyInstanceUID != out[0].StudyInstanceUID and other.PatientID != out[0].PatientID


def test_options_keep_what_the_partner_is_configured_to_see(tmp_path: Path) -> None:
    path = make_study(tmp_path / "s", ct=1, mr=0, sc=0, size=32)[0]
    d = deid(
        path,
        "retain_longitudinal_dates",
        "retain_device_identity",
        "retain_institution_identity",
        "clean_descriptors",
    )
    assert d.StudyDate == "20261201" and d.StationName == "CT-ROOM-2"
    assert not d.get("PatientBirthDate"), "the study's dates are kept, never the patient's birth date"
    assert d.InstitutionName == "Klinikum Beispielstadt"
    # the descriptor stays, with the patient's name taken out of it
    assert d.StudyDescription.startswith("CT Kopf") and "CANARYZQX" not in d.StudyDescription
    assert {i.CodeValue for i in d.DeidentificationMethodCodeSequence} == {
        "113100",
        "113106",
        "113109",
        "113112",
        "113105",
    }
