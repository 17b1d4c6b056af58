"""Patient identity on arrival (`gateway.core.coerce`): what a coerced instance carries, that the change is
recorded where PS3.3 puts it and can be undone, and how reconciliation picks a local patient (fast tier)."""

from __future__ import annotations

import datetime as dt
import io

import pydicom
from pydicom.dataset import Dataset

from gateway.core.coerce import CoercionRule, LocalPatient, apply, pick_local, plan, undo

RULE = CoercionRule(issuer="KLINIKUM-A", id_prefix="A-", universal_entity_id="1.2.276.0.1", reconcile="pacs")
WHEN = dt.datetime(2026, 12, 4, 15, 30, 0)


def instance() -> Dataset:
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    ds.PatientBirthDate = "19700101"
    ds.PatientID = "12345"
    ds.IssuerOfPatientID = "HIS-A"
    ds.StudyInstanceUID = "1.2.3"
    return ds


def roundtrip(ds: Dataset) -> Dataset:
    """Written as Part 10 and read back: what the PACS receives."""
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_a_foreign_id_is_prefixed_issued_and_kept_where_the_standard_says() -> None:
    ds = instance()
    c = plan(RULE, "12345", "HIS-A", None, "Klinikum A", "gateway-b")
    apply(ds, c, WHEN)
    ds = roundtrip(ds)
    assert ds.PatientID == "A-12345" and ds.IssuerOfPatientID == "KLINIKUM-A"
    q = ds.IssuerOfPatientIDQualifiersSequence[0]
    assert q.UniversalEntityID == "1.2.276.0.1" and q.UniversalEntityIDType == "ISO"
    other = ds.OtherPatientIDsSequence[-1]
    assert (other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID) == ("12345", "HIS-A", "TEXT")
    item = ds.OriginalAttributesSequence[0]
    assert item.ReasonForTheAttributeModification == "COERCE" and item.ModifyingSystem == "gateway-b"
    assert (
        item.SourceOfPreviousValues == "Klinikum A" and item.AttributeModificationDateTime == "20261204153000"
    )
    original = item.ModifiedAttributesSequence[0]
    assert original.PatientID == "12345" and original.IssuerOfPatientID == "HIS-A"
    assert ds.PatientName == "DOE^JANE" and ds.StudyInstanceUID == "1.2.3", "nothing else changes"


def test_coercion_is_reversible_and_applying_it_twice_keeps_one_other_id() -> None:
    ds = instance()
    c = plan(RULE, "12345", "HIS-A", None, "A", "gateway-b")
    apply(ds, c, WHEN)
    apply(ds, c, WHEN)  # a retried forward starts from D: again, but even applied twice nothing is duplicated
    assert [o.PatientID for o in ds.OtherPatientIDsSequence] == ["12345"]
    undo(ds)
    assert [o.PatientID for o in ds.OtherPatientIDsSequence] == ["12345"] and ds.PatientID == "A-12345"
    undo(ds)
    assert ds == instance(), "undone, the instance is what arrived"


def test_a_reconciled_patient_takes_the_local_id_and_issuer() -> None:
    ds = instance()
    c = plan(RULE, "12345", "HIS-A", LocalPatient("L-0815", "HOSPITAL-B"), "A", "gateway-b")
    apply(ds, c, WHEN)
    assert ds.PatientID == "L-0815" and ds.IssuerOfPatientID == "HOSPITAL-B" and c.reconciled
    assert "IssuerOfPatientIDQualifiersSequence" not in ds
    assert ds.OtherPatientIDsSequence[-1].PatientID == "12345"


def test_reconciliation_takes_exactly_one_local_patient() -> None:
    local = LocalPatient("L-0815", "HOSPITAL-B")
    assert pick_local([local], "KLINIKUM-A", "A-12345") == local
    assert pick_local([], "KLINIKUM-A", "A-12345") is None
    assert pick_local([local, LocalPatient("L-0999", "HOSPITAL-B")], "KLINIKUM-A", "A-12345") is None, (
        "ambiguous"
    )
    # the patient this gateway made earlier under the coerced identity is not a local match
    assert pick_local([local, LocalPatient("A-12345", "KLINIKUM-A")], "KLINIKUM-A", "A-12345") == local
    assert pick_local([local, local], "KLINIKUM-A", "A-12345") == local, "the same patient answered twice"


def test_an_instance_without_a_patient_id_is_not_given_a_shared_one() -> None:
    c = plan(RULE, "", "", None, "A", "gateway-b")
    assert c.patient_id == "" and c.issuer == "KLINIKUM-A", (
        "the prefix alone would make one patient of all such"
    )
