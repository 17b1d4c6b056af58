"""Forwarding inbound studies to a real Orthanc that accepts some instances and rejects others."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core.dicominfo import dataset_offset, read_info
from gateway.devtools import orthanc as orthanc_peer
from gateway.devtools.studies import make_study
from tests.conftest import free_port, storescu, wait_for
from tests.faults import refusing_pacs

pytestmark = pytest.mark.slow


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Orthanc on loopback, started by the test with its own configuration."""
    peer = orthanc_peer.start(tmp_path / "orthanc")
    try:
        yield peer.dicom_port, peer.http_port
    finally:
        peer.stop()


def rest(http_port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as r:
        return r.read()  # type: ignore[no-any-return]


def forwards(gw) -> dict[tuple[str, str], int]:  # type: ignore[no-untyped-def]
    return {
        (f["pacs"], f["state"]): f["count"] for f in json.loads(gw.cli("status", "--json"))["pacs_forwards"]
    }


def test_inbound_study_reaches_the_pacs_and_refusals_are_reported(mail, make_gateway, orthanc, tmp_path):  # type: ignore[no-untyped-def]
    """Two PACS: a real Orthanc takes everything; another refuses MR (0xA700): retried, then reported."""
    dicom_port, http_port = orthanc
    refuser_port = free_port()
    pacs = (
        f'[[pacs]]\nname = "orthanc"\nhost = "127.0.0.1"\nport = {dicom_port}\nae_title = "ORTHANC"\n'
        f'[[pacs]]\nname = "refuser"\nhost = "127.0.0.1"\nport = {refuser_port}\nae_title = "REFUSER"\n'
        "max_attempts = 2\nretry_base = 1\n"
    )
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1, tail=pacs)
    a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1)
    sources = make_study(tmp_path / "s", ct=3, mr=2, sc=1, size=32)
    with refusing_pacs(refuser_port) as refuser_got:
        b.start()
        a.start()
        assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0
        wait_for(
            lambda: (
                forwards(b)
                == {("orthanc", "accepted"): 6, ("refuser", "accepted"): 4, ("refuser", "rejected"): 2}
            ),
            120,
            1,
            "every instance accepted or reported",
        )
    assert len(refuser_got) == 4

    stored = {}
    for orthanc_id in json.loads(rest(http_port, "/instances")):
        data = rest(http_port, f"/instances/{orthanc_id}/file")
        stored[read_info(data).sop_instance_uid] = data
    assert len(stored) == len(sources)
    for src in sources:
        sent = src.read_bytes()
        got = stored[read_info(src).sop_instance_uid]
        assert got[dataset_offset(got) :] == sent[dataset_offset(sent) :], (
            "the PACS has the instance unchanged"
        )
    # the refusals are visible to the operator with the PACS's status, and in monitoring
    con = sqlite3.connect(str(b.d_root / "catalog.sqlite"))
    rows = con.execute(
        "SELECT attempts, status, error FROM pacs_forwards WHERE state = 'rejected'"
    ).fetchall()
    con.close()
    assert rows == [(2, 0xA700, "PACS answered 0xA700")] * 2
    check = b.cli("check-mk")
    assert '1 "DMG PACS forwarding"' in check and "2 instances refused" in check


def test_forwarding_over_dicom_tls(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """Orthanc with DICOM TLS and required client certificates; the gateway verifies it and presents its own."""
    tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki_dir / "mail-server.pem"),
        "DicomTlsPrivateKey": str(pki_dir / "mail-server.key"),
        "DicomTlsTrustedCertificates": str(pki_dir / "ca.pem"),
        "DicomTlsRemoteCertificateRequired": True,
    }
    peer = orthanc_peer.start(tmp_path / "orthanc", tls)
    dicom_port, http_port = peer.dicom_port, peer.http_port
    try:
        pacs = (
            f'[[pacs]]\nname = "orthanc"\nhost = "127.0.0.1"\nport = {dicom_port}\nae_title = "ORTHANC"\n'
            f'tls_ca = "{pki_dir / "ca.pem"}"\ntls_cert = "{pki_dir / "gateway-b-tls.pem"}"\n'
            f'tls_key = "{pki_dir / "gateway-b-tls.key"}"\n'
        )
        b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1, tail=pacs)
        a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1)
        b.start()
        a.start()
        sources = make_study(tmp_path / "s", ct=2, mr=1, sc=0, size=32)
        assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0
        wait_for(lambda: forwards(b) == {("orthanc", "accepted"): 3}, 120, 1, "forwarding over TLS")
        assert len(json.loads(rest(http_port, "/instances"))) == len(sources)
    finally:
        peer.stop()
