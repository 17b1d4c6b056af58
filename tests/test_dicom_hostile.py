"""Hostile DICOM peers: not allowed, malformed PDUs, abandoned associations. The gateway keeps serving."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.devtools.studies import make_study
from tests import dicomscu
from tests.conftest import GatewayProcess, storescu, wait_for


def echo(port: int, calling: str = "MODALITY", bind: str = "127.0.0.1") -> str:
    """C-ECHO with pynetdicom as SCU; returns 'ok', 'rejected' or 'aborted'."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc, rj = dicomscu.associate(ae, port, "GATEWAY_C", bind=bind)
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        return "ok" if status and status.Status == 0 else "failed"
    return "rejected" if rj is not None else "aborted"


@pytest.fixture
def gw(make_gateway, tmp_path) -> GatewayProcess:  # type: ignore[no-untyped-def]
    g = make_gateway(
        "gateway-c",
        [("gateway-b", "gateway-b", "TO_B")],
        stability_delay=600,
        gateway_extra='allowed_calling_ae = ["MODALITY"]\nallowed_networks = ["127.0.0.1/32"]\ndicom_timeout = 3',
    )
    g.start()
    return g


def test_only_allowed_peers_get_in(gw, tmp_path):  # type: ignore[no-untyped-def]
    assert echo(gw.port) == "ok"
    assert echo(gw.port, calling="INTRUDER") == "rejected"
    assert echo(gw.port, bind="127.0.0.2") == "rejected"
    make_study(tmp_path / "s", ct=1, mr=0, sc=0, size=16)
    r = storescu(gw.port, "TO_B", tmp_path / "s")  # storescu calls as MODALITY: allowed
    assert r.returncode == 0, r.stderr
    log = gw.log.read_text()
    assert "calling AE title 'INTRUDER' not allowed" in log and "peer address not allowed" in log


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 64,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        struct.pack(">BBI", 0x01, 0x00, 0xFFFFFFF0) + b"\x00\x01",  # A-ASSOCIATE-RQ claiming 4 GB
        struct.pack(">BBI", 0x04, 0x00, 0x00000010) + b"\xff" * 16,  # P-DATA before any association
        struct.pack(">BBI", 0x01, 0x00, 0x00000044)
        + b"\x00\x01\x00\x00"
        + b"\x20" * 32
        + b"\x10" * 32,  # cut short
    ],
)
def test_malformed_pdus_do_not_hurt(gw, garbage):  # type: ignore[no-untyped-def]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        try:
            while s.recv(4096):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    assert gw.proc is not None and gw.proc.poll() is None, "the gateway died"
    assert echo(gw.port) == "ok"


def test_abandoned_associations_are_dropped(gw):  # type: ignore[no-untyped-def]
    # 1. TCP open, nothing said
    silent = socket.create_connection(("127.0.0.1", gw.port), timeout=15)
    # 2. an association established, then silence
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title="GATEWAY_C")
    assert assoc.is_established
    assert echo(gw.port) == "ok", "others are served meanwhile"
    start = time.monotonic()
    silent.settimeout(15)
    try:
        received = silent.recv(4096)  # the server closes the idle connection: end of stream
    except ConnectionResetError:
        received = b""
    closed_after = time.monotonic() - start
    silent.close()
    assert received == b"", "the server should close a connection that never says anything"
    wait_for(lambda: not assoc.is_established, 15, 0.1, "the idle association to be dropped")
    assert closed_after < 15
    assert echo(gw.port) == "ok"
