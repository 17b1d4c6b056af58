"""End to end with two gateway processes, DCMTK storescu as the modality, and the real mail cluster.

A (MariaDB catalog) ──mail via Postfix──▶ mailbox ──POP3S via Dovecot──▶ B (SQLite catalog).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from gateway.config import load
from gateway.core.dicominfo import dataset_offset, read_info
from gateway.devtools.studies import make_study
from gateway.storage import Storage
from tests.conftest import CANARIES, GatewayProcess, storescu, wait_for


def status(gw: GatewayProcess) -> dict:  # type: ignore[type-arg]
    return json.loads(gw.cli("status", "--json"))


def transfers(gw: GatewayProcess, direction: str, state: str) -> list[dict]:  # type: ignore[type-arg]
    return [t for t in status(gw)["transfers"] if t["direction"] == direction and t["state"] == state]


def stored_at(gw: GatewayProcess, src: Path) -> Path:
    return Storage(load(gw.config).d_root).instance_path(read_info(src))


def assert_delivered_identically(a: GatewayProcess, b: GatewayProcess, sources: list[Path]) -> None:
    for src in sources:
        sent = src.read_bytes()
        at_a = stored_at(a, src).read_bytes()
        at_b = stored_at(b, src).read_bytes()
        assert at_b == at_a, f"{src.name}: B's file differs from A's"
        # What storescu put on the wire is the dataset; the file meta is written by the receiving SCP.
        assert at_b[dataset_offset(at_b) :] == sent[dataset_offset(sent) :], (
            f"{src.name}: dataset bytes differ"
        )


def assert_no_canaries(*gws: GatewayProcess) -> None:
    for gw in gws:
        text = gw.log.read_bytes() + json.dumps(status(gw)).encode() + gw.cli("status").encode()
        for canary in CANARIES:
            assert canary not in text, f"patient data {canary!r} leaked into {gw.name}'s logs or status"


def pair(make_gateway, mariadb_url: str, **a_kw: object) -> tuple[GatewayProcess, GatewayProcess]:  # type: ignore[no-untyped-def]
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    a_kw = {"database_url": mariadb_url, "stability_delay": 2, "max_mail_size": "1MB", **a_kw}
    a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], **a_kw)
    return a, b


def test_study_goes_from_a_to_b_through_the_cluster(mail, mariadb_url, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    a, b = pair(make_gateway, mariadb_url)
    b.start()
    a.start()
    sources = make_study(tmp_path / "study", ct=30, mr=20, sc=12)
    assert len(sources) >= 60
    r = storescu(a.port, "TO_B", tmp_path / "study")
    assert r.returncode == 0, r.stderr

    wait_for(lambda: transfers(b, "in", "complete"), 180, 1, "B to complete the inbound transfer")
    sent = wait_for(lambda: transfers(a, "out", "sent"), 30, 1, "A to mark the transfer sent")
    assert len(sent) == 1
    assert sent[0]["parts_total"] >= 3, "the size cap must split the study over several mails"
    assert sent[0]["instances"] == len(sources)
    inbound = transfers(b, "in", "complete")
    assert len(inbound) == 1 and inbound[0]["instances"] == len(sources)
    assert inbound[0]["parts_done"] == sent[0]["parts_total"]
    assert_delivered_identically(a, b, sources)
    assert_no_canaries(a, b)
    assert "complete" in b.cli("status")
    # the packager checked each mail it built for the wire, so the sender did not scan them again
    metas = [json.loads(m.read_text()) for m in (a.d_root / "spool" / "outbox" / "done").glob("*/meta.json")]
    built = [m for m in metas if m.get("kind") != "mdn"]
    assert len(built) == sent[0]["parts_total"] and all(m["wire_ready"] is True for m in built), metas


def test_delivery_with_one_smtp_and_one_pop3_node_down(mail, mariadb_url, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    mail.set_node(1, up=False, pop3=False)  # SMTP on mail1 refuses connections
    mail.set_node(2, up=False, smtp=False)  # POP3S on mail2 refuses connections
    a, b = pair(make_gateway, mariadb_url)
    b.start()
    a.start()
    sources = make_study(tmp_path / "study", ct=8, mr=4, sc=2)
    assert storescu(a.port, "TO_B", tmp_path / "study").returncode == 0
    wait_for(lambda: transfers(b, "in", "complete"), 180, 1, "delivery through the remaining nodes")
    assert_delivered_identically(a, b, sources)


def test_sigkill_after_acknowledgement_loses_nothing_and_sends_once(
    mail, make_gateway, mariadb_url, tmp_path
):  # type: ignore[no-untyped-def]
    a, b = pair(make_gateway, mariadb_url, stability_delay=6)
    b.start()
    a.start()
    sources = make_study(tmp_path / "study", ct=10, mr=8, sc=4)
    r = storescu(a.port, "TO_B", tmp_path / "study")
    assert r.returncode == 0, r.stderr
    a.kill()  # the modality has its successes; the study is still waiting for the quiet period
    assert not transfers(a, "out", "sent"), "killed too late: the study was already sent"
    a.start()
    wait_for(lambda: transfers(b, "in", "complete"), 180, 1, "the study to arrive after the restart")
    # nothing left that could still become a duplicate: A's outbox has nothing waiting, and A made one transfer
    wait_for(lambda: status(a)["queues"]["outbox"]["waiting"] == 0, 60, 0.5, "A's outbox to be empty")
    assert [t["state"] for t in status(a)["transfers"] if t["direction"] == "out"] == ["sent"]
    inbound = status(b)
    assert len([t for t in inbound["transfers"] if t["direction"] == "in"]) == 1
    assert sum(s["instances"] for s in inbound["studies"]) == len(sources)
    assert_delivered_identically(a, b, sources)


def test_unknown_called_ae_is_refused_and_echo_works(mail, mariadb_url, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    a, _ = pair(make_gateway, mariadb_url)
    a.start()
    make_study(tmp_path / "s", ct=1, mr=0, sc=0)
    r = storescu(a.port, "NOBODY", tmp_path / "s")
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" in r.stdout + r.stderr
    echo = subprocess.run(
        ["echoscu", "-aec", "GATEWAY_A", "127.0.0.1", str(a.port)], capture_output=True, text=True, timeout=30
    )
    assert echo.returncode == 0, echo.stderr


def test_send_command_and_permanent_rejection(mail, mariadb_url, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    """`send` enqueues files by hand; a 5xx (unknown mailbox) fails the transfer with the server's reply."""
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    a = make_gateway(
        "gateway-a",
        [("gateway-b", "gateway-b", "TO_B"), ("ghost", "ghost", "TO_GHOST")],
        database_url=mariadb_url,
        max_mail_size="256KB",
    )
    b.start()
    a.start()
    sources = make_study(tmp_path / "study", ct=6, mr=3, sc=1)
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    out = a.cli("send", "--to", "gateway-b", str(tmp_path / "study"))
    assert "10 instances" in out
    assert "0 of them already stored here) in 1 studies queued for gateway-b" in out
    assert "1 files not DICOM, 0 conflicts" in out
    wait_for(lambda: transfers(b, "in", "complete"), 120, 1, "the hand-sent study at B")
    assert_delivered_identically(a, b, sources)

    # the modality's original files of a study A already received (its SCP wrote another file meta header):
    # the same instances, no conflict
    make_study(tmp_path / "again", ct=2, mr=1, sc=0, size=16)
    assert storescu(a.port, "TO_B", tmp_path / "again").returncode == 0
    out = a.cli("send", "--to", "gateway-b", str(tmp_path / "again"))
    assert "3 instances (" in out and "3 of them already stored here" in out and "0 conflicts" in out
    assert json.loads(a.cli("status", "--json"))["conflicts"] == []
    assert not list((a.d_root / "conflicts").glob("*.dcm"))

    a.cli("send", "--to", "ghost", str(sources[0]))
    failed = wait_for(
        lambda: transfers(a, "out", "failed"), 60, 1, "the transfer to an unknown mailbox to fail"
    )
    assert "550" in failed[0]["error"] and "rejected" in failed[0]["error"]
