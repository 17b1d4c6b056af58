"""The audit trail with the real pipeline: A (a modality's study, sent by mail) and B (received from A, forwarded to
Orthanc, answered with a receipt) report to a real rsyslog over TLS with client certificates; every message passes
the schema check; the repository is stopped for a minute while a second study passes and gets every event
afterwards; the local copies verify and tell the patient's whole history."""

from __future__ import annotations

import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from gateway.audit import AuditTrail
from gateway.config import load
from gateway.core.audit import check
from gateway.devtools import orthanc as orthanc_peer
from gateway.devtools.auditrepo import AuditRepository
from gateway.devtools.studies import CANARY_ID, make_study
from tests import dicomscu
from tests.conftest import CANARIES, storescu, wait_for
from tests.test_e2e import status


def audit_section(repo: AuditRepository, name: str) -> str:
    return f'[audit]\nrepository = "127.0.0.1:{repo.port}"\napp_name = "{name}"\n'


def trail_of(gw) -> AuditTrail:  # type: ignore[no-untyped-def]
    s = load(gw.config)
    return AuditTrail(s.e_root / "audit", s.name)


def local(gw) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    t = trail_of(gw)
    return [(r.seq, r.xml) for d in t.days() for r in t.records(d)]


def complete_in(gw) -> int:  # type: ignore[no-untyped-def]
    return sum(
        t["instances"] for t in status(gw)["transfers"] if t["direction"] == "in" and t["state"] == "complete"
    )


def test_both_gateways_report_every_event_to_the_repository_even_across_its_outage(
    mail, make_gateway, pki_dir, tmp_path: Path
) -> None:
    repo = AuditRepository(tmp_path / "repository", pki_dir)
    repo.start()
    pacs = orthanc_peer.start(tmp_path / "orthanc")
    try:
        b = make_gateway(
            "gateway-b",
            [("gateway-a", "gateway-a", "TO_A")],
            poll_interval=1,
            tail=audit_section(repo, "gateway-b")
            + f'[[pacs]]\nname = "orthanc"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\nae_title = "ORTHANC"\n',
        )
        a = make_gateway(
            "gateway-a",
            [("gateway-b", "gateway-b", "TO_B")],
            stability_delay=1,
            tail=audit_section(repo, "gateway-a"),
        )
        b.start()
        a.start()
        make_study(tmp_path / "s1", ct=3, mr=2, sc=0, size=32)
        assert storescu(a.port, "TO_B", tmp_path / "s1").returncode == 0
        wait_for(lambda: complete_in(b) == 5, 180, 1, "B to receive the first study")

        def arrived(gw, name: str) -> bool:  # type: ignore[no-untyped-def]
            seqs = {seq for app, seq, _, _ in repo.messages() if app == name}
            return bool(local(gw)) and {seq for seq, _ in local(gw)} <= seqs

        wait_for(
            lambda: arrived(a, "gateway-a") and arrived(b, "gateway-b"),
            60,
            0.5,
            "every event in the repository",
        )

        # a modality calling an AE title the gateway does not serve: refused, and audited
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(CTImageStorage)
        refused, _ = dicomscu.associate(intruder, a.port, "NOBODY")
        assert not refused.is_established
        # B forwarded to the PACS and A has B's receipt
        wait_for(
            lambda: (
                any("receipt received from partner gateway-b" in x for _, x in local(a))
                and any("forwarded to PACS orthanc" in x for _, x in local(b))
            ),
            180,
            1,
            "B's forward to the PACS and A's receipt",
        )

        # the repository goes away for a minute while a second study passes
        repo.stop()
        stopped = time.monotonic()
        before = {"a": len(local(a)), "b": len(local(b))}
        make_study(tmp_path / "s2", ct=2, mr=0, sc=0, size=32, seed=5)
        assert storescu(a.port, "TO_B", tmp_path / "s2").returncode == 0
        wait_for(lambda: complete_in(b) == 7, 180, 1, "B to receive the second study")
        wait_for(
            lambda: len(local(a)) >= before["a"] + 2 and len(local(b)) >= before["b"] + 1,
            60,
            0.5,
            "the second study's events in the local copies",
        )
        # check_mk says what waits, and that nothing is lost
        assert "records wait on E: for the repository" in a.cli("check-mk")
        wait_for(lambda: time.monotonic() - stopped >= 60, 90, 1, "the outage to last a minute")
        repo.start()
        wait_for(
            lambda: arrived(a, "gateway-a") and arrived(b, "gateway-b"), 180, 0.5, "the events of the outage"
        )

        wait_for(lambda: "has every record" in a.cli("check-mk"), 30, 1, "check_mk to see the backlog gone")
        messages = repo.messages()
        for _, _, _, xml in messages:
            assert check(xml) == [], check(xml)
        texts = {
            app: " ".join(xml for a2, _, _, xml in messages if a2 == app)
            for app in ("gateway-a", "gateway-b")
        }
        assert "Application Start" in texts["gateway-a"] and "Application Start" in texts["gateway-b"]
        assert "received over DICOM from MODALITY" in texts["gateway-a"]
        assert "sent by mail to partner gateway-b" in texts["gateway-a"]
        assert "received by mail from partner gateway-a" in texts["gateway-b"]
        assert CANARY_ID in texts["gateway-a"], "ATNA names the patient in the audit trail"
        assert (
            "Association Accepted" in texts["gateway-a"]
            and 'AlternativeUserID="MODALITY"' in texts["gateway-a"]
        )
        assert (
            "Association Refused" in texts["gateway-a"] and "called AE title 'NOBODY'" in texts["gateway-a"]
        )
        assert "forwarded to PACS orthanc" in texts["gateway-b"]
        assert "receipt sent to partner gateway-a" in texts["gateway-b"]
        assert "receipt received from partner gateway-b" in texts["gateway-a"]
        assert "Software Configuration" in texts["gateway-b"] and "PACS orthanc added" in texts["gateway-b"]
        # a record sent twice (around the outage) is marked as such; none is missing (checked above)
        seen: dict[tuple[str, int], int] = {}
        for app, seq, resent, _ in messages:
            if (app, seq) in seen:
                assert resent, f"{app} record {seq} arrived twice without the mark"
            seen[(app, seq)] = seen.get((app, seq), 0) + 1

        for gw in (a, b):
            trail = trail_of(gw)
            assert all(trail.verify(day)[0] for day in trail.days())
            # the operational log and status still carry no patient data
            text = gw.log.read_bytes() + gw.cli("status").encode()
            for canary in CANARIES:
                assert canary not in text
        history = a.cli("audit", "--patient", CANARY_ID)
        assert "DICOM Instances Transferred [C]" in history and "source: MODALITY@127.0.0.1" in history
        assert "DICOM Instances Transferred [R]" in history and "destination: gateway-b" in history
        assert "chain intact" in a.cli("audit", "verify")
        # B's trail tells the patient's whole way: from A, to the PACS, the receipt back
        at_b = b.cli("audit", "--patient", CANARY_ID)
        for step in (
            "DICOM Instances Transferred [C]",
            "source: gateway-a",
            "destination: orthanc",
            "Receipt [R]",
        ):
            assert step in at_b, at_b
        both = a.cli("audit", "--patient", CANARY_ID, "--also", str(b.config))
        assert "[gateway-a] " in both and "[gateway-b] " in both and "destination: orthanc" in both
    finally:
        repo.stop()
        pacs.stop()
