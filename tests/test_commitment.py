"""Proof of delivery through real peers: A → the mail cluster → B → a real Orthanc with storage commitment.

Orthanc answers C-STORE Success even when a Lua `ReceivedInstanceFilter` drops the instance; only storage
commitment reveals it. Orthanc reports on a new association to B's DICOM port (B's calling AE is in its
DicomModalities with AllowStorageCommitment). A's view of each transfer: contents verified by B's receipt, and
what B's PACS committed, naming exactly the instances it did not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from gateway.devtools import orthanc as orthanc_peer
from gateway.devtools.studies import make_study
from tests.conftest import storescu, wait_for

DROP_MR = 'function ReceivedInstanceFilter(dicom, origin, info)\n  return dicom.Modality ~= "MR"\nend\n'


def test_orthanc_commits_and_a_lua_filter_that_drops_instances_is_revealed(
    mail, make_gateway, tmp_path: Path
):  # type: ignore[no-untyped-def]
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    (tmp_path / "drop.lua").write_text(DROP_MR)
    peer = orthanc_peer.start(
        tmp_path / "orthanc",
        {
            "LuaScripts": [str(tmp_path / "drop.lua")],
            "DicomModalities": {
                "gateway-b": {
                    "AET": "GATEWAY_B",
                    "Host": "127.0.0.1",
                    "Port": b.port,
                    "AllowStorageCommitment": True,
                }
            },
            "MaximumStorageCacheSize": 0,
        },
    )
    try:
        b.config.write_text(
            b.config.read_text()
            + f'\n[[pacs]]\nname = "orthanc"\nhost = "127.0.0.1"\nport = {peer.dicom_port}\nae_title = "ORTHANC"\n'
            "storage_commitment = true\nmax_attempts = 2\nretry_base = 1\ntimeout = 20\n"
        )
        a = make_gateway(
            "gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1, poll_interval=1
        )
        b.start()
        a.start()
        mixed = make_study(tmp_path / "mixed", ct=3, mr=2, sc=0, size=32)
        assert storescu(a.port, "TO_B", tmp_path / "mixed").returncode == 0
        wait_for(lambda: _out(a, "warning"), 180, 1, "A has B's receipt for the mixed study")
        ct_only = make_study(tmp_path / "ct", ct=2, mr=0, sc=0, size=32)
        assert storescu(a.port, "TO_B", tmp_path / "ct").returncode == 0
        wait_for(lambda: _out(a, "confirmed"), 180, 1, "A has B's receipt for the CT study")
        orthanc_has = {
            str(json.loads(peer.rest(f"/instances/{i}/simplified-tags"))["SOPInstanceUID"])
            for i in json.loads(peer.rest("/instances"))
        }
    finally:
        peer.stop()

    mr = sorted(str(ds.SOPInstanceUID) for ds in map(pydicom.dcmread, mixed) if ds.Modality == "MR")
    assert orthanc_has == {str(pydicom.dcmread(p).SOPInstanceUID) for p in mixed + ct_only} - set(mr)
    # the mixed study: B stored all of it (verified), Orthanc committed the CT and not the MR instances
    [warned] = _out(a, "warning")
    assert warned["proof"] == "verified"
    assert warned["partner_pacs"] == {"committed": 3, "not-committed": 2}
    assert sorted(s.split(" ")[0] for s in warned["not_committed"]) == mr
    assert all("0x0112 no such object instance" in s for s in warned["not_committed"])
    text = a.cli("status")
    assert "confirmed by partner with a warning: stored; the PACS did not commit 2 of 5 instances" in text
    assert "contents verified; partner's PACS: 2 not-committed of 5" in text
    # the CT-only study: committed by the partner's PACS, contents verified
    [confirmed] = _out(a, "confirmed")
    assert confirmed["chain"] == ["contents verified", "committed by partner's PACS"]
    assert "contents verified; committed by partner's PACS" in text
    # B's own view: what Orthanc committed and what it did not, with Orthanc's reason
    text_b = b.cli("status")
    reason = "not committed by the PACS: 0x0112 no such object instance"
    assert f"PACS orthanc: 3 committed, 2 NOT COMMITTED ({reason})" in text_b
    assert "PACS orthanc: 2 committed" in text_b
    assert '1 "DMG Receipts"' in a.cli("check-mk")


def _out(gw, receipt: str) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    status = json.loads(gw.cli("status", "--json"))
    return [t for t in status["transfers"] if t["direction"] == "out" and t["receipt"] == receipt]
