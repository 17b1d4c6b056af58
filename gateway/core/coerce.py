"""Patient identity on arrival: a partner's patient IDs coerced into this site's namespace, auditable and reversible.

Patient ID 12345 at the sending hospital is another person here. For a partner with `coerce` configured, every
instance it sends is changed on its way into the local PACS (never on D:, whose bytes stay what arrived: they are
the evidence receipts and de-duplication rest on, and every coerced instance keeps its SOP Instance UID, so it is
traceable to them):

- the original Patient ID (with its issuer, if any) is added to Other Patient IDs Sequence (0010,1002);
- Patient ID becomes the local one when reconciliation found exactly one patient in the PACS with the same name
  and birth date (with that patient's issuer), else `id_prefix` + the original ID, issued by `issuer` (Issuer of
  Patient ID (0010,0021), and Issuer of Patient ID Qualifiers Sequence (0010,0024) when a universal entity ID is
  configured);
- the values replaced are kept in Original Attributes Sequence (0400,0561) (PS3.3 C.12.1: Modified Attributes
  Sequence, when, by which system, from where, reason COERCE), so the change can be undone.

Pure: `plan` decides the values, `apply` writes them into a dataset; no clock (`now` is passed in), no network.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

PATIENT_IDENTITY = (
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
)


@dataclass(frozen=True)
class CoercionRule:
    """A partner's `coerce` table."""

    issuer: str  # Issuer of Patient ID for the partner's IDs (the sending institution)
    id_prefix: str = ""
    universal_entity_id: str = ""  # e.g. the institution's OID; with it, the issuer's qualifiers are set
    universal_entity_id_type: str = "ISO"
    reconcile: str = ""  # the [[pacs]] asked by C-FIND for a local patient with the same name and birth date


@dataclass(frozen=True)
class LocalPatient:
    """A patient the local PACS knows (from a C-FIND answer)."""

    patient_id: str
    issuer: str = ""


@dataclass(frozen=True)
class Coercion:
    """The identity one instance gets in the local PACS, and where it came from."""

    patient_id: str
    issuer: str
    qualifiers: tuple[str, str] | None  # (Universal Entity ID, its type) of the issuer
    original_id: str
    original_issuer: str
    reconciled: bool
    source: str  # the partner (Source of Previous Values)
    system: str  # this gateway (Modifying System)


def plan(
    rule: CoercionRule,
    original_id: str,
    original_issuer: str,
    local: LocalPatient | None,
    source: str,
    system: str,
) -> Coercion:
    """The identity for an instance of the partner's patient `original_id` (local: what reconciliation found)."""
    if local is not None:
        return Coercion(
            local.patient_id, local.issuer, None, original_id, original_issuer, True, source, system
        )
    qualifiers = (
        (rule.universal_entity_id, rule.universal_entity_id_type) if rule.universal_entity_id else None
    )
    return Coercion(
        (rule.id_prefix + original_id)[:64] if original_id else "",  # no ID stays none: never one shared "A-"
        rule.issuer,
        qualifiers,
        original_id,
        original_issuer,
        False,
        source,
        system,
    )


def pick_local(candidates: list[LocalPatient], coerced_issuer: str, coerced_id: str) -> LocalPatient | None:
    """The one local patient a C-FIND by name and birth date found, or None (nobody, or several: ambiguous).
    Patients this gateway created earlier under the coerced identity are not local matches."""
    local = {
        c
        for c in candidates
        if c.patient_id
        and not (c.patient_id == coerced_id or (coerced_issuer and c.issuer == coerced_issuer))
    }
    return next(iter(local)) if len(local) == 1 else None


def apply(ds: Dataset, c: Coercion, now: dt.datetime) -> None:
    """Write the coerced identity into `ds`, keeping what it replaces (see the module docstring)."""
    original = Dataset()
    for keyword in PATIENT_IDENTITY:
        if keyword in ds:
            original[keyword] = copy.deepcopy(ds[keyword])  # ds's elements are changed in place below
    if "PatientID" not in original:
        original.PatientID = ""  # it had none: undoing the change removes it again
    other = Dataset()
    other.PatientID = c.original_id
    if c.original_issuer:
        other.IssuerOfPatientID = c.original_issuer
    other.TypeOfPatientID = "TEXT"
    kept = [item for item in ds.get("OtherPatientIDsSequence", []) if item.get("PatientID") != c.original_id]
    ds.OtherPatientIDsSequence = Sequence([*kept, other])
    ds.PatientID = c.patient_id
    if c.issuer:
        ds.IssuerOfPatientID = c.issuer
    elif "IssuerOfPatientID" in ds:
        del ds.IssuerOfPatientID
    if c.qualifiers:
        q = Dataset()
        q.UniversalEntityID, q.UniversalEntityIDType = c.qualifiers
        ds.IssuerOfPatientIDQualifiersSequence = Sequence([q])
    elif "IssuerOfPatientIDQualifiersSequence" in ds:
        del ds.IssuerOfPatientIDQualifiersSequence
    record_original(ds, original, now, c.system, c.source)


def record_original(ds: Dataset, replaced: Dataset, now: dt.datetime, system: str, source: str) -> None:
    """Append to Original Attributes Sequence (PS3.3 C.12.1) the values a coercion replaced: when, by which
    system, from where, reason COERCE (also used when a de-identified result is matched back)."""
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([replaced])
    item.AttributeModificationDateTime = now.strftime("%Y%m%d%H%M%S")
    item.ModifyingSystem = system[:64]
    item.SourceOfPreviousValues = source[:64]
    item.ReasonForTheAttributeModification = "COERCE"
    ds.OriginalAttributesSequence = Sequence([*ds.get("OriginalAttributesSequence", []), item])


def undo(ds: Dataset) -> None:
    """Restore the identity the last coercion replaced (the inverse of `apply`; for audits and tests)."""
    items = list(ds.get("OriginalAttributesSequence", []))
    if not items or "ModifiedAttributesSequence" not in items[-1]:
        raise ValueError("no coercion recorded")
    original = items[-1].ModifiedAttributesSequence[0]
    for keyword in PATIENT_IDENTITY:
        if keyword in ds:
            del ds[keyword]
    for keyword in PATIENT_IDENTITY:
        if keyword in original and not (keyword == "PatientID" and original.PatientID == ""):
            ds[keyword] = original[keyword]
    if len(items) == 1:
        del ds.OriginalAttributesSequence
    else:
        ds.OriginalAttributesSequence = Sequence(items[:-1])
