"""De-identified sending with the real pipeline: A sends a study to B, which must not know the patient; B sees a
pseudonym and UIDs it cannot reverse, never the image with burnt-in annotation; B's result comes back and A files it
in a real Orthanc under the original study and patient."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from gateway.config import load
from gateway.core.dicominfo import read_info
from gateway.devtools import orthanc as orthanc_peer
from gateway.devtools.studies import CANARY_ID, make_study
from tests.conftest import CANARIES, storescu, wait_for
from tests.test_coerce_e2e import orthanc_study
from tests.test_e2e import assert_no_canaries, status


def stored_study(gw, study: str | None = None) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    """The studies stored at `gw` once every inbound transfer there is complete."""
    view = status(gw)
    if not any(t["direction"] == "in" for t in view["transfers"]):
        return []
    if any(t["direction"] == "in" and t["state"] != "complete" for t in view["transfers"]):
        return []
    return [s for s in view["studies"] if study is None or s["study_uid"] == study]


def test_a_partner_gets_a_deidentified_study_and_its_result_comes_back_to_the_patient(
    mail, make_gateway, tmp_path: Path
) -> None:
    peer = orthanc_peer.start(tmp_path / "orthanc")
    try:
        pacs = f'[[pacs]]\nname = "orthanc"\nhost = "127.0.0.1"\nport = {peer.dicom_port}\nae_title = "ORTHANC"\n'
        a = make_gateway(
            "gateway-a",
            [("gateway-b", "gateway-b", "TO_B")],
            stability_delay=1,
            partner_extra={"gateway-b": 'deidentify = { options = ["retain_longitudinal_dates"] }'},
            tail=pacs,
        )
        b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
        a.start()
        b.start()
        paths = make_study(tmp_path / "s", ct=3, mr=0, sc=1, size=32)
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.StudyDate = "20261130"
            if ds.Modality == "OT":  # the secondary capture has the patient's name burnt into its pixels
                ds.BurnedInAnnotation = "YES"
            ds.save_as(p)
        original = read_info(paths[0])
        assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0

        got = wait_for(lambda: stored_study(b), 180, 1, "B to receive the de-identified study")
        assert len(got) == 1 and got[0]["instances"] == 3, "the burnt-in image is not sent"
        deid_study = got[0]["study_uid"]
        assert deid_study != original.study_uid and deid_study.startswith("2.25.")
        b_root = load(b.config).d_root
        for f in (b_root / "images").rglob("*.dcm"):
            data = f.read_bytes()
            for canary in CANARIES:
                assert canary not in data, f"{canary!r} reached the partner"
            ds = pydicom.dcmread(f)
            assert ds.PatientIdentityRemoved == "YES" and ds.PatientID.startswith("DMG-")
            assert ds.StudyDate == "20261130", "retain_longitudinal_dates keeps the dates"
        sent = [t for t in status(a)["transfers"] if t["direction"] == "out"]
        assert len(sent) == 1 and sent[0]["state"] == "sent" and sent[0]["instances"] == 3
        # the partner's receipt names the UIDs it got: the proof of delivery still holds
        wait_for(
            lambda: [
                t
                for t in status(a)["transfers"]
                if t["direction"] == "out" and t.get("receipt") == "confirmed"
            ],
            120,
            1,
            "B's receipt to confirm the de-identified study",
        )

        # B's result on the study goes back to A (here: B sends the study it got back), and A's PACS files it under
        # the original study and patient
        said = b.cli("resend", "--to", "gateway-a", deid_study)
        assert "3 instances" in said, said
        back = wait_for(
            lambda: (x := orthanc_study(peer, original.study_uid)) and x["count"] == 3 and x,
            180,
            1,
            "the result in A's PACS under the original study",
        )
        assert back["patient"]["PatientID"] == CANARY_ID
        assert back["tags"]["SOPInstanceUID"] in {read_info(p).sop_instance_uid for p in paths}
        assert "PatientIdentityRemoved" not in back["tags"]
        assert (
            back["tags"]["OriginalAttributesSequence"][-1]["ModifiedAttributesSequence"][0][
                "StudyInstanceUID"
            ]
            == deid_study
        )
        assert json.loads(peer.rest("/statistics"))["CountStudies"] == 1
        assert_no_canaries(a, b)
    finally:
        peer.stop()
