"""DICOM over TLS (PS3.15 Annex B, the BCP 195 profile) on the listener, with DCMTK's storescu as the modality."""

from __future__ import annotations

import json
import socket
import subprocess

from gateway.devtools.studies import make_study
from tests.conftest import storescu
from tests.ports import free_port


def test_storescu_over_tls_with_a_client_certificate(make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    tls_port = free_port()
    gw = make_gateway(
        "gateway-a",
        [("gateway-b", "gateway-b", "TO_B")],
        stability_delay=60,
        gateway_extra=(
            f"dicom_tls_port = {tls_port}\n"
            f'dicom_tls_cert = "{pki_dir / "mail-server.pem"}"\n'
            f'dicom_tls_key = "{pki_dir / "mail-server.key"}"\n'
            f'dicom_tls_ca = "{pki_dir / "ca.pem"}"'
        ),
    )
    gw.start()
    make_study(tmp_path / "s", ct=3, mr=0, sc=0)
    ca = str(pki_dir / "ca.pem")
    tls = ["+tls", str(pki_dir / "gateway-b-tls.key"), str(pki_dir / "gateway-b-tls.pem"), "+cf", ca]

    # a modality with a certificate of the site's CA: stored
    r = subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", "GATEWAY_A", *tls, "127.0.0.1", str(tls_port),
         "+sd", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(gw.cli("status", "--json"))["studies"][0]["instances"] == 3

    # plain DICOM on the TLS port: refused (no association, nothing stored)
    make_study(tmp_path / "t", ct=1, mr=0, sc=0)
    plain = storescu(tls_port, "GATEWAY_A", tmp_path / "t")
    assert plain.returncode != 0
    # TLS without a client certificate, when the listener requires one: refused
    anonymous = subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", "GATEWAY_A", "+tla", "+cf", ca, "127.0.0.1", str(tls_port),
         "+sd", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert anonymous.returncode != 0
    # a certificate from another CA: refused
    rogue = subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", "GATEWAY_A", "+tls", str(pki_dir / "rogue-gateway-a-tls.key"),
         str(pki_dir / "rogue-gateway-a-tls.pem"), "+cf", ca, "127.0.0.1", str(tls_port), "+sd", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rogue.returncode != 0
    assert json.loads(gw.cli("status", "--json"))["studies"][0]["instances"] == 3
    # and the plain port still works for the modalities in the server room
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5):
        pass
    assert storescu(gw.port, "GATEWAY_A", tmp_path / "t").returncode == 0
    # the audit trail has each refusal at the TLS handshake (Node Authentication) and the accepted associations
    from gateway.audit import AuditTrail
    from gateway.config import load
    from tests.conftest import wait_for

    trail = AuditTrail(load(gw.config).e_root / "audit", "gateway-a")

    def texts() -> list[str]:
        return [r.xml for d in trail.days() for r in trail.records(d)]

    wait_for(
        lambda: sum("Association Refused" in t and "TLS handshake failed" in t for t in texts()) >= 3,
        30,
        0.5,
        "the three refused TLS handshakes in the audit trail",
    )
    refusals = [t for t in texts() if "TLS handshake failed" in t]
    assert all("Node Authentication" in t and 'NetworkAccessPointID="127.0.0.1"' in t for t in refusals)
    wait_for(
        lambda: (
            sum("Association Accepted" in t and 'AlternativeUserID="MODALITY"' in t for t in texts()) >= 2
        ),
        30,
        0.5,
        "the accepted associations (TLS port and plain port) in the audit trail",
    )
