"""Part of stage 7 (forward): the patient identity each instance from a partner gets in the local PACS, decided
before the instances are sent: coerced for a partner with `coerce` (`gateway.core.coerce`), and matched back to
the original study and patient for a result on a study we de-identified for a partner with `deidentify`
(`gateway.core.deid`: the replacements recorded when it was packaged; only UIDs we made are mapped back).

Per partner and patient (the original ID, name and birth date, read from the stored file), once per round: with
`reconcile`, the named PACS is asked by C-FIND for patients with that exact name and birth date; exactly one (not
one this gateway created under the coerced identity) gives the local ID; nobody, several, or a PACS that cannot
be asked gives the coerced foreign ID (`id_prefix`, `issuer`), so a study is never held back by the lookup. The
answers are kept for `CACHE_SECONDS`, so a large study asks once. Logs say what was decided, never who.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import pydicom

from gateway.adapters.dicom import scu
from gateway.catalog import Catalog
from gateway.config import Partner, Settings
from gateway.core.coerce import Coercion, LocalPatient, pick_local, plan
from gateway.core.deid import PATIENT_MODULE, Reidentification

log = logging.getLogger(__name__)

CACHE_SECONDS = 600.0
_IDENTITY_TAGS = ["PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate"]


def _identity(path: Path) -> tuple[str, str, str, str] | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_IDENTITY_TAGS)
    except Exception:  # unreadable here: the instance is held back (see `attach`), never forwarded uncoerced
        return None
    return (
        str(ds.get("PatientID", "") or ""),
        str(ds.get("IssuerOfPatientID", "") or ""),
        str(ds.get("PatientName", "") or ""),
        str(ds.get("PatientBirthDate", "") or ""),
    )


def _study_of(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    except Exception:  # unreadable: not matched back (forwarded as it came, like a study that is not ours)
        return ""
    return str(ds.get("StudyInstanceUID", "") or "")


def _patient_of(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(PATIENT_MODULE))
    return {k: str(ds.get(k, "") or "") for k in PATIENT_MODULE}


class Coercer:
    """Attaches to each due forward of a coercing partner's instance the `Coercion` it is sent with."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self._found: dict[tuple[str, str, str], tuple[float, list[LocalPatient] | None]] = {}

    async def _local(self, pacs_name: str, name: str, birth: str) -> list[LocalPatient] | None:
        """The PACS's patients by name and birth date (None: it could not be asked), cached."""
        key, now = (pacs_name, name, birth), time.monotonic()
        hit = self._found.get(key)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        pacs = next(p for p in self.settings.pacs if p.name == pacs_name)
        try:
            found = [
                LocalPatient(i, s) for i, s in await asyncio.to_thread(scu.find_patients, pacs, name, birth)
            ]
        except (scu.FindFailed, OSError, RuntimeError, ValueError) as exc:
            # a library's message may quote the query (the patient's name): only our own words are logged
            why = str(exc) if isinstance(exc, scu.FindFailed) else type(exc).__name__
            log.warning(
                "reconciliation: PACS %s could not be asked (%s); the coerced ID is used", pacs_name, why
            )
            found = None
        self._found = {k: v for k, v in self._found.items() if now - v[0] < CACHE_SECONDS}
        self._found[key] = (now, found)
        return found

    async def attach(self, items: list[dict[str, Any]], root: Path) -> int:
        """Set item["coerce"] for the items from coercing partners and item["reidentify"] for results on studies
        we de-identified for their partner; return how many items were given either."""
        todo, returning = [], []
        for item in items:
            partner = self.settings.partner_by_name(str(item.get("origin", "")))
            if item.get("source") != "mail" or partner is None:
                continue
            if partner.deidentify is not None:
                returning.append((item, partner))
            elif partner.coerce is not None:
                todo.append((item, partner))
        matched = await self._reidentify(returning, root) if returning else 0
        # the partner's own studies (not results on ours) are coerced like any partner's, if it is configured to
        todo += [(i, p) for i, p in returning if "reidentify" not in i and p.coerce is not None]
        if not todo:
            return matched
        if not todo:
            return 0
        identities = await asyncio.to_thread(lambda: [_identity(root / str(i["path"])) for i, _ in todo])
        decided: dict[tuple[str, str, str, str, str], Coercion] = {}
        for (item, partner), identity in zip(todo, identities, strict=True):
            if identity is None:
                item["hold"] = "its patient identity could not be read for coercion"
                continue
            pid, issuer, name, birth = identity
            rule = partner.coerce
            assert rule is not None
            key = (partner.name, pid, issuer, name, birth)
            if key not in decided:
                local = None
                if rule.reconcile and name and birth:
                    found = await self._local(rule.reconcile, name, birth)
                    local = pick_local(found or [], rule.issuer, rule.id_prefix + pid)
                    if found and local is None:
                        log.warning(
                            "reconciliation: %d patients in PACS %s match by name and birth date; the coerced ID "
                            "is used for instance %s",
                            len(found),
                            rule.reconcile,
                            item["sop_uid"],
                        )
                source = partner.institution or partner.name
                decided[key] = plan(rule, pid, issuer, local, source, self.settings.name)
                log.info(
                    "instance %s from %s: patient identity %s for the PACS",
                    item["sop_uid"],
                    partner.name,
                    "reconciled with the PACS's patient"
                    if decided[key].reconciled
                    else "coerced to the partner's issuer",
                )
            item["coerce"] = decided[key]
        return len(todo) + matched

    async def _reidentify(self, returning: list[tuple[dict[str, Any], Partner]], root: Path) -> int:
        """Results on a study we de-identified for the partner go into the PACS under the original study and
        patient; anything else from such a partner goes as it came (it is not ours to re-identify)."""
        studies = await asyncio.to_thread(lambda: [_study_of(root / str(i["path"])) for i, _ in returning])
        found: dict[tuple[str, str], Reidentification | None] = {}
        for (item, partner), study in zip(returning, studies, strict=True):
            key = (partner.name, study)
            if key not in found:
                found[key] = await self._original(partner, study, root)
            if found[key] is not None:
                item["reidentify"] = found[key]
        return sum(1 for i, _ in returning if "reidentify" in i)

    async def _original(self, partner: Partner, study: str, root: Path) -> Reidentification | None:
        mapped = await self.catalog.deid_originals(partner.name, study)
        if mapped is None:
            return None
        original, uids = mapped
        kept = [i for i in await self.catalog.routable(original, unrouted_only=False) if not i.purged]
        if not kept:
            log.warning(
                "a result from %s on study %s: its original is no longer here; forwarded as it came",
                partner.name,
                original,
            )
            return None
        patient = await asyncio.to_thread(_patient_of, root / kept[0].path)
        log.info("a result from %s on study %s: matched back to the original study", partner.name, original)
        return Reidentification(uids, patient, partner.institution or partner.name, self.settings.name)


def now_local() -> dt.datetime:
    """When a coercion is recorded (Attribute Modification DateTime)."""
    return dt.datetime.now()
