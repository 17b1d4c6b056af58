"""Forwarding inbound studies to a real Orthanc that accepts some instances and rejects others."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from gateway.core.dicominfo import dataset_offset, read_info
from gateway.devtools import orthanc as orthanc_peer
from gateway.devtools.studies import make_study
from tests.conftest import WEB_PASSWORD, storescu, wait_for
from tests.faults import aborting_pacs, refusing_pacs
from tests.ports import free_port
from tests.syntaxes import make_syntax_study, send_each


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


def page(web_port: int, path: str = "/") -> str:
    """A page of the web port, as the operator sees it (logged in)."""
    req = urllib.request.Request(f"http://127.0.0.1:{web_port}{path}")
    req.add_header("Authorization", "Basic " + base64.b64encode(f"operator:{WEB_PASSWORD}".encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return html.unescape(r.read().decode())


def metric_values(exposition: str, name: str, **labels: str) -> list[float]:
    """The values of one Prometheus metric whose labels include these."""
    values = []
    for line in exposition.splitlines():
        m = re.match(r"(\w+)\{(.*)\} (\S+)$", line)
        if m and m[1] == name and all(f'{k}="{v}"' in m[2].split(",") for k, v in labels.items()):
            values.append(float(m[3]))
    return values


def forwards(gw) -> dict[tuple[str, str], int]:  # type: ignore[no-untyped-def]
    return {
        (f["pacs"], f["state"]): f["count"] for f in json.loads(gw.cli("status", "--json"))["pacs_forwards"]
    }


def test_inbound_study_reaches_the_pacs_and_refusals_are_reported(mail, make_gateway, orthanc, tmp_path):  # type: ignore[no-untyped-def]
    """Three PACS: a real Orthanc takes everything; another refuses MR (0xA700); a third aborts the association at
    every C-STORE. Refusals are retried, then reported with what happened, each attempt bounded by the PACS's
    `timeout`; the sender's receipt says so."""
    dicom_port, http_port = orthanc
    refuser_port, aborter_port = free_port(), free_port()
    pacs = (
        f'[[pacs]]\nname = "orthanc"\nhost = "127.0.0.1"\nport = {dicom_port}\nae_title = "ORTHANC"\n'
        f'[[pacs]]\nname = "refuser"\nhost = "127.0.0.1"\nport = {refuser_port}\nae_title = "REFUSER"\n'
        "max_attempts = 2\nretry_base = 1\n"
        f'[[pacs]]\nname = "aborter"\nhost = "127.0.0.1"\nport = {aborter_port}\nae_title = "ABORTER"\n'
        "max_attempts = 2\nretry_base = 1\ntimeout = 3\nassociations = 1\n"
    )
    web_a, web_b = free_port(), free_port()
    b = make_gateway(
        "gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1, tail=pacs, web_port=web_b
    )
    a = make_gateway(
        "gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1, poll_interval=1, web_port=web_a
    )
    sources = make_study(tmp_path / "s", ct=3, mr=2, sc=1, size=32)
    with refusing_pacs(refuser_port) as refuser_got, aborting_pacs(aborter_port) as aborter_saw:
        b.start()
        a.start()
        assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0
        wait_for(
            lambda: (
                forwards(b)
                == {
                    ("orthanc", "accepted"): 6,
                    ("refuser", "accepted"): 4,
                    ("refuser", "rejected"): 2,
                    ("aborter", "rejected"): 6,
                }
            ),
            120,
            1,
            "every instance accepted or reported",
        )
    assert len(refuser_got) == 4
    assert len(aborter_saw) == 2, "one C-STORE per attempt: the abort ends the association"
    # the refusals are visible to the operator with what the PACS did, and in monitoring
    con = sqlite3.connect(str(b.d_root / "catalog.sqlite"))
    rows = con.execute(
        "SELECT pacs, attempts, status, error FROM pacs_forwards WHERE state = 'rejected'"
    ).fetchall()
    con.close()
    assert (
        sorted(r for r in rows if r[0] == "refuser") == [("refuser", 2, 0xA700, "PACS answered 0xA700")] * 2
    )
    aborted = [r[3] for r in rows if r[0] == "aborter"]
    assert aborted.count("no answer within 3 s (association aborted?)") >= 1
    assert set(aborted) <= {"no answer within 3 s (association aborted?)", "association ended"}
    check = b.cli("check-mk")
    assert '1 "DMG PACS forwarding"' in check and "8 instances refused" in check
    # the sender learns it from B's signed receipt: a warning with the reason, visible in its status and check_mk
    wait_for(lambda: "refused 6 of 6" in a.cli("status"), 60, 1, "the warning receipt reached A")
    assert '1 "DMG Receipts"' in a.cli("check-mk") and "1 with a warning" in a.cli("check-mk")
    # both status views show each transfer's outcome: the receipt at A, what each PACS did at B
    status_b = b.cli("status")
    assert "PACS orthanc: 6 accepted" in status_b
    assert "PACS refuser: 4 accepted, 2 REFUSED (PACS answered 0xA700)" in status_b
    assert "PACS aborter: 6 REFUSED" in status_b
    page_b = page(web_b)
    assert "PACS refuser: 4 accepted, 2 REFUSED (PACS answered 0xA700)" in page_b
    assert "confirmed by partner with a warning: stored; the PACS refused 6 of 6 instances" in page(web_a)
    # the receipt mail B sent is counted in its outgoing bytes, per node; A counts what it fetched per node
    out = metric_values(page(web_b, "/metrics"), "dmg_bytes_total", direction="out", kind="receipt")
    assert out and sum(out) > 1000
    assert sum(metric_values(page(web_a, "/metrics"), "dmg_bytes_total", direction="in")) > 0

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


PLAIN_PACS = {  # an Orthanc that takes only uncompressed data: forwarding must convert for it
    f"{kind}TransferSyntaxAccepted": False
    for kind in ("Deflated", "Jpeg", "Jpeg2000", "JpegLossless", "Jpip", "Mpeg2", "Mpeg4", "Rle", "H265")
}


def test_every_transfer_syntax_reaches_the_pacs_in_every_compression_mode(mail, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    """Implicit, big endian, deflated, RLE, JPEG lossless, JPEG 12-bit, JPEG-LS, JPEG 2000 and Explicit VR LE
    instances (written by DCMTK) go A → cluster → B → two real Orthancs, once per compression mode of the partner.
    B stores what the mail carried (the modality's bytes where A did not recompress), its catalog's transfer syntax
    is the file's, and both PACS get every instance with every pixel: the one that takes only uncompressed data
    gets it converted."""
    full = orthanc_peer.start(tmp_path / "orthanc-full")
    plain = orthanc_peer.start(tmp_path / "orthanc-plain", PLAIN_PACS)
    try:
        pacs = "".join(
            f'[[pacs]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {peer.dicom_port}\nae_title = "ORTHANC"\n'
            "timeout = 20\n"
            for name, peer in (("full", full), ("plain", plain))
        )
        modes = ("none", "deflate", "jpeg2000-lossless")
        b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1, tail=pacs)
        a = make_gateway(
            "gateway-a",
            [(f"b-{m}", f"gateway-b+{m}", f"TO_B{i}") for i, m in enumerate(modes)],
            stability_delay=1,
            partner_extra={f"b-{m}": f'compression = "{m}"' for m in modes},
        )
        b.start()
        a.start()
        studies = {m: make_syntax_study(tmp_path / m, seed=i + 3) for i, m in enumerate(modes)}
        for i, m in enumerate(modes):
            send_each(a.port, f"TO_B{i}", studies[m])
        total = sum(len(s) for s in studies.values())
        wait_for(
            lambda: forwards(b) == {("full", "accepted"): total, ("plain", "accepted"): total},
            240,
            1,
            "every instance accepted by both PACS",
        )

        con = sqlite3.connect(str(a.d_root / "catalog.sqlite"))
        a_paths = dict(con.execute("SELECT sop_uid, path FROM instances").fetchall())
        con.close()
        con = sqlite3.connect(str(b.d_root / "catalog.sqlite"))
        catalog = {
            sop: (path, ts)
            for sop, path, ts in con.execute("SELECT sop_uid, path, transfer_syntax FROM instances")
        }
        con.close()
        for mode, study in studies.items():
            for stem, src in study.items():
                sent = src.read_bytes()
                sop = read_info(sent).sop_instance_uid
                path, ts = catalog[sop]
                stored = (b.d_root / path).read_bytes()
                assert read_info(stored).transfer_syntax == ts, (
                    f"{mode}/{stem}: catalog says what the file is"
                )
                original_ts = read_info(sent).transfer_syntax
                recompressed = original_ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1") and mode != "none"
                if not recompressed:
                    # what A's SCP stored is what the modality sent on the wire (DCMTK re-deflates a Deflated
                    # file when it sends it, so the wire bytes, not the file's, are the modality's)
                    assert stored == (a.d_root / a_paths[sop]).read_bytes(), (
                        f"{mode}/{stem}: B holds the modality's bytes, as A received them"
                    )
                else:
                    want = {
                        "deflate": "1.2.840.10008.1.2.1.99",
                        "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
                    }
                    assert ts == want[mode], f"{mode}/{stem}"
                pixels = pydicom.dcmread(io.BytesIO(sent)).pixel_array
                for peer in (full, plain):
                    got = _orthanc_file(peer, sop)
                    assert np.array_equal(pydicom.dcmread(io.BytesIO(got)).pixel_array, pixels), (
                        f"{mode}/{stem}: every pixel reached the PACS"
                    )
                    if peer is plain:
                        assert not UID(read_info(got).transfer_syntax).is_compressed
    finally:
        full.stop()
        plain.stop()


def _orthanc_file(peer: orthanc_peer.Orthanc, sop_uid: str) -> bytes:
    """The file Orthanc holds for one SOP Instance UID."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{peer.http_port}/tools/lookup", data=sop_uid.encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        found = json.loads(r.read())
    ids = [f["ID"] for f in found if f["Type"] == "Instance"]
    assert len(ids) == 1, f"the PACS holds instance {sop_uid}"
    return peer.rest(f"/instances/{ids[0]}/file")
