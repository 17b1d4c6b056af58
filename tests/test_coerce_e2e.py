"""Patient identity on arrival with the real pipeline: A sends two studies through the mail cluster to B, whose
address book coerces A's patient IDs on the way into a real Orthanc, reconciling by C-FIND with the patients
Orthanc already knows."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import pydicom

from gateway.config import load
from gateway.core.dicominfo import read_info
from gateway.devtools import orthanc as orthanc_peer
from gateway.devtools.studies import make_study
from gateway.storage import Storage
from tests.conftest import storescu, wait_for
from tests.test_e2e import assert_no_canaries, status

COERCE = (
    'coerce = { issuer = "KLINIKUM-A", id_prefix = "A-", universal_entity_id = "1.2.276.0.7230010.3.0.99", '
    'reconcile = "orthanc" }'
)


def post(port: int, path: str, body: bytes) -> dict:  # type: ignore[type-arg]
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def orthanc_study(peer: orthanc_peer.Orthanc, study_uid: str) -> dict | None:  # type: ignore[type-arg]
    """Orthanc's patient tags and one instance's tags for a study, once it has all `count` instances."""
    found = post(
        peer.http_port,
        "/tools/find",
        json.dumps({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode(),
    )
    if not found:
        return None
    study = json.loads(peer.rest(f"/studies/{found[0]}"))
    instances = json.loads(peer.rest(f"/studies/{found[0]}/instances"))
    tags = json.loads(peer.rest(f"/instances/{instances[0]['ID']}/tags?simplify"))
    return {"patient": study["PatientMainDicomTags"], "count": len(instances), "tags": tags}


def relabel(paths: list[Path], name: str, pid: str) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientID = name, pid
        ds.save_as(p)


def test_a_partners_patients_arrive_in_the_pacs_under_the_local_identity(
    mail, make_gateway, tmp_path: Path
) -> None:
    peer = orthanc_peer.start(tmp_path / "orthanc", {"DicomAlwaysAllowFind": True})
    try:
        # a patient Orthanc already knows, under this hospital's own ID
        known = make_study(tmp_path / "known", ct=1, mr=0, sc=0, size=16)
        relabel(known, "MUSTERMANN^ERIKA", "LOCAL-0815")
        post(peer.http_port, "/instances", known[0].read_bytes())

        pacs = f'[[pacs]]\nname = "orthanc"\nhost = "127.0.0.1"\nport = {peer.dicom_port}\nae_title = "ORTHANC"\n'
        b = make_gateway(
            "gateway-b",
            [("gateway-a", "gateway-a", "TO_A")],
            poll_interval=1,
            partner_extra={"gateway-a": COERCE},
            tail=pacs,
        )
        a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1)
        b.start()
        a.start()
        # study 1: a patient of A's that B's PACS does not know; study 2: Erika Mustermann, ID 4711 at A
        stranger = make_study(tmp_path / "s1", ct=3, mr=0, sc=0, size=32, seed=3)
        erika = make_study(tmp_path / "s2", ct=2, mr=0, sc=0, size=32, seed=4)
        relabel(erika, "MUSTERMANN^ERIKA", "4711")
        erika_study = read_info(erika[0]).study_uid  # another study of hers than the one Orthanc has
        for folder in ("s1", "s2"):
            assert storescu(a.port, "TO_B", tmp_path / folder).returncode == 0

        s1 = wait_for(
            lambda: (x := orthanc_study(peer, read_info(stranger[0]).study_uid)) and x["count"] == 3 and x,
            180,
            1,
            "the first study in Orthanc",
        )
        s2 = wait_for(
            lambda: (x := orthanc_study(peer, erika_study)) and x["count"] == 2 and x,
            180,
            1,
            "Erika's study in Orthanc",
        )
        # not known here: A's ID, prefixed, issued by Klinikum A; the original kept where PS3.3 says
        assert s1["patient"]["PatientID"] == "A-PIDCANARY7731"
        tags = s1["tags"]
        assert tags["IssuerOfPatientID"] == "KLINIKUM-A"
        assert (
            tags["IssuerOfPatientIDQualifiersSequence"][0]["UniversalEntityID"] == "1.2.276.0.7230010.3.0.99"
        )
        assert tags["OtherPatientIDsSequence"][-1]["PatientID"] == "PIDCANARY7731"
        modified = tags["OriginalAttributesSequence"][0]
        assert modified["ReasonForTheAttributeModification"] == "COERCE"
        assert modified["ModifiedAttributesSequence"][0]["PatientID"] == "PIDCANARY7731"
        assert (
            modified["ModifyingSystem"] == "gateway-b" and modified["SourceOfPreviousValues"] == "gateway-a"
        )
        # known here by name and birth date: the study is filed under her local ID
        assert s2["patient"]["PatientID"] == "LOCAL-0815"
        assert s2["tags"]["OtherPatientIDsSequence"][-1]["PatientID"] == "4711"
        assert "IssuerOfPatientIDQualifiersSequence" not in s2["tags"]
        patients = json.loads(peer.rest("/patients"))
        assert len(patients) == 2, "Erika is one patient in the PACS, the stranger another"

        # D: at B keeps the bytes that arrived: receipts and de-duplication rest on them
        stored = Storage(load(b.config).d_root).instance_path(read_info(stranger[0]))
        assert pydicom.dcmread(io.BytesIO(stored.read_bytes())).PatientID == "PIDCANARY7731"
        assert all(t["state"] == "complete" for t in status(b)["transfers"] if t["direction"] == "in")
        assert_no_canaries(a, b)
    finally:
        peer.stop()
