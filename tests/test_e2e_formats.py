"""Every partner format end to end: two gateway processes, DCMTK storescu as the modality, the real mail cluster.

One receiving gateway B stands for several partners of A through address extensions (gateway-b+pgp-j2k@…): the
cluster delivers them all to B's mailbox, and A keeps one address-book entry (format, compression, split,
receipts) per address. B reads its mailbox over IMAPS with its client certificate in the first test.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import numpy as np
import pydicom

from gateway.adapters.smtp import SmtpCluster
from gateway.config import load
from gateway.devtools.mailcluster import NODE_COUNT, MailCluster, node_ip
from gateway.devtools.pki import DOMAIN
from gateway.devtools.studies import make_ct_study, make_study
from gateway.tls import mail_client_context
from tests.conftest import GatewayProcess, storescu, wait_for
from tests.test_e2e import assert_no_canaries, stored_at, transfers

FORMATS = ("smime", "pgp", "smime-zip")
COMPRESSIONS = {"none": "none", "deflate": "deflate", "j2k": "jpeg2000-lossless"}
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


def status(gw: GatewayProcess) -> dict:  # type: ignore[type-arg]
    return json.loads(gw.cli("status", "--json"))


def out_transfer(gw: GatewayProcess, partner: str) -> dict | None:  # type: ignore[type-arg]
    found = [t for t in status(gw)["transfers"] if t["direction"] == "out" and t["partner"] == partner]
    return found[0] if found else None


def maildir(cluster: MailCluster, local: str) -> list[Path]:
    box = cluster.maildirs / DOMAIN / local
    return sorted(f for sub in ("new", "cur") for f in (box / sub).glob("*"))


def submit_as(gw: GatewayProcess, raw: list[bytes], to: str) -> None:
    """Hand mails to the cluster as gateway `gw` would (real SMTP, STARTTLS, its client certificate)."""
    settings = load(gw.config)

    async def run() -> None:
        smtp = SmtpCluster(settings.mail, mail_client_context(settings.mail))
        for data in raw:
            await smtp.send(settings.mail.address, to, data)

    asyncio.run(run())


def pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def assert_same_instance(a_file: Path, b_file: Path, compression: str) -> None:
    """Byte-identical without compression; otherwise every element and every pixel identical."""
    a_bytes, b_bytes = a_file.read_bytes(), b_file.read_bytes()
    if compression == "none":
        assert b_bytes == a_bytes, f"{b_file.name}: B's file differs from A's"
        return
    a, b = pydicom.dcmread(a_file), pydicom.dcmread(b_file)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    for elem in a:
        if elem.tag != 0x7FE00010:
            assert b[elem.tag].value == elem.value, f"{b_file.name}: {elem.keyword} differs"
    assert np.array_equal(pixels(a_file), pixels(b_file)), f"{b_file.name}: pixels differ"


# ------------------------------------------------------------------------------------------ all formats
def test_every_format_and_compression_arrives_identical_and_is_confirmed(  # type: ignore[no-untyped-def]
    mail, mariadb_url, make_gateway, tmp_path
):
    combos = [(fmt, short) for fmt in FORMATS for short in COMPRESSIONS]
    partners, extra = [], {}
    for i, (fmt, short) in enumerate(combos, start=1):
        name = f"b-{fmt}-{short}"
        partners.append((name, f"gateway-b+{fmt}-{short}", f"TO_B{i}"))
        # B's one mailbox stands for nine partners, so its receipts (from B's one address) would match none of
        # them: these partners do not send receipts; the receipt tests below use one address per partner
        extra[name] = f'format = "{fmt}"\ncompression = "{COMPRESSIONS[short]}"\nreceipts = false'
    imap = ", ".join(f'"{node_ip(n)}:993"' for n in range(1, NODE_COUNT + 1))
    b = make_gateway(
        "gateway-b",
        [("gateway-a", "gateway-a", "TO_A")],
        poll_interval=1,
        pop3_nodes=["127.0.0.1:9"],  # nothing listens there: B can only read its mailbox over IMAPS
        mail_extra=f'protocol = "imap"\nimap_nodes = [{imap}]',
    )
    a = make_gateway(
        "gateway-a",
        partners,
        database_url=mariadb_url,
        stability_delay=2,
        max_mail_size="256KB",  # several mails per study
        partner_extra=extra,
        poll_interval=1,
    )
    b.start()
    a.start()
    studies = {}
    for i, (fmt, short) in enumerate(combos, start=1):
        folder = tmp_path / f"study-{fmt}-{short}"
        studies[(fmt, short)] = make_study(folder, ct=4, mr=4, sc=1, size=128, seed=i)
        r = storescu(a.port, f"TO_B{i}", folder)
        assert r.returncode == 0, r.stderr

    wait_for(
        lambda: len(transfers(b, "in", "complete")) == len(combos),
        420,
        2,
        "B to complete one inbound transfer per format and compression",
    )
    for (_fmt, short), sources in studies.items():
        for src in sources:
            assert_same_instance(stored_at(a, src), stored_at(b, src), COMPRESSIONS[short])
        if short == "j2k":  # uncompressed CT/MR went over as JPEG 2000 and B keeps it so (pixel-identical)
            ct = pydicom.dcmread(stored_at(b, sources[0]), stop_before_pixels=True)
            assert ct.file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS

    outs = {t["partner"]: t for t in status(a)["transfers"] if t["direction"] == "out"}
    assert len(outs) == len(combos) and all(t["state"] == "sent" for t in outs.values())
    assert all(t["parts_total"] >= 2 for t in outs.values()), "the size cap must split every study"
    assert all(t["receipt"] == "not-requested" for t in outs.values())
    assert a.cli("status").count("no receipts from this partner") == len(combos)
    for fmt in FORMATS:  # compressed studies take fewer bytes on the wire
        assert outs[f"b-{fmt}-j2k"]["bytes_wire"] < outs[f"b-{fmt}-none"]["bytes_wire"]
        assert outs[f"b-{fmt}-deflate"]["bytes_wire"] < outs[f"b-{fmt}-none"]["bytes_wire"]
    in_states = {m["state"] for m in status(b)["mails_by_state"] if m["direction"] == "in"}
    assert in_states == {"ingested"}, in_states
    assert_no_canaries(a, b)


# ------------------------------------------------------------------------------------------ receipts
def test_a_part_corrupted_in_transit_fails_at_the_partner_with_the_reason(  # type: ignore[no-untyped-def]
    mail, mariadb_url, make_gateway, tmp_path
):
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    a = make_gateway(
        "gateway-a",
        [("gateway-b", "gateway-b", "TO_B")],
        database_url=mariadb_url,
        stability_delay=2,
        max_mail_size="256KB",
        poll_interval=1,
    )
    a.start()  # B stays down until one of its mails has been damaged
    make_study(tmp_path / "study", ct=4, mr=4, sc=0, size=128)
    assert storescu(a.port, "TO_B", tmp_path / "study").returncode == 0
    sent = wait_for(lambda: transfers(a, "out", "sent"), 120, 1, "A to send the study")
    total = sent[0]["parts_total"]
    assert total >= 2
    files = wait_for(lambda: (f := maildir(mail, "gateway-b")) and len(f) == total and f, 60, 0.5, "delivery")
    assert sent[0]["receipt"] == "awaited"

    # a relay garbles the middle of one mail's encrypted body (valid base64, wrong bytes)
    victim = files[len(files) // 2]
    raw = bytearray(victim.read_bytes())
    middle = len(raw) // 2
    start = raw.index(b"\n", middle) + 1
    raw[start : start + 40] = bytes(ord("A") if c != ord("A") else ord("B") for c in raw[start : start + 40])
    victim.write_bytes(bytes(raw))

    b.start()
    failed = wait_for(
        lambda: (t := out_transfer(a, "gateway-b")) and t["receipt"] == "failed" and t,
        180,
        2,
        "A to learn from B's receipt that a part failed",
    )
    assert failed["receipt_detail"], "the partner's reason must be shown"
    # B's words from its fixed vocabulary, carried by the MDN: never the exception text behind them
    assert "could not be decrypted or its signature verified" in failed["receipt_detail"], failed[
        "receipt_detail"
    ]
    assert "altered" not in failed["receipt_detail"] and "Error" not in failed["receipt_detail"]
    text = a.cli("status")
    assert "failed at partner" in text and failed["receipt_detail"][:40] in text
    assert_no_canaries(a, b)


def test_a_partner_without_receipts_never_waits_and_a_silent_one_is_flagged(  # type: ignore[no-untyped-def]
    mail, mariadb_url, make_gateway, tmp_path
):
    """No gateway reads these mailboxes: nobody will ever answer. Also measures J2K on a realistic CT series."""
    a = make_gateway(
        "gateway-a",
        [
            ("quiet", "gateway-b+quiet", "TO_QUIET"),  # a partner whose software sends no receipts
            ("silent", "gateway-c", "TO_SILENT"),  # a partner that should answer but does not
        ],
        database_url=mariadb_url,
        stability_delay=2,
        mail_extra="receipt_deadline = 4",
        partner_extra={"quiet": 'receipts = false\ncompression = "jpeg2000-lossless"'},
    )
    a.start()
    # the same CT series (same pixels, other UIDs) to both: uncompressed to `silent`, JPEG 2000 to `quiet`
    make_ct_study(tmp_path / "ct1", count=8, size=512, seed=7)
    make_ct_study(tmp_path / "ct2", count=8, size=512, seed=7)
    assert storescu(a.port, "TO_SILENT", tmp_path / "ct1").returncode == 0
    assert storescu(a.port, "TO_QUIET", tmp_path / "ct2").returncode == 0

    overdue = wait_for(
        lambda: (t := out_transfer(a, "silent")) and t["receipt"] == "overdue" and t,
        120,
        1,
        "the silent partner's transfer to be flagged overdue",
    )
    quiet = out_transfer(a, "quiet")
    assert quiet is not None and quiet["state"] == "sent"
    assert quiet["receipt"] == "not-requested", "a partner without receipts is never awaited"
    assert "no receipt from the partner" in overdue["receipt_detail"]
    # the mail to the quiet partner did not ask for a receipt
    quiet_mail = maildir(mail, "gateway-b")[0].read_bytes()
    assert b"Disposition-Notification-To" not in quiet_mail.split(b"\r\n\r\n")[0].split(b"\n\n")[0]
    # check_mk: one overdue receipt is a warning
    check = a.cli("check-mk")
    assert any(line.startswith('1 "DMG Receipts"') and "1 overdue" in line for line in check.splitlines())
    # JPEG 2000 lossless on a CT series: at least 2x fewer bytes on the wire than uncompressed
    ratio = overdue["bytes_wire"] / quiet["bytes_wire"]
    assert ratio >= 2.0, f"JPEG 2000 saved only {ratio:.2f}x"
    assert abs(quiet["bytes"] - overdue["bytes"]) < 100  # the same DICOM bytes (UIDs differ in length)


# ------------------------------------------------------------------------------------------ message/partial
def test_partial_fragments_shuffled_and_across_a_restart_arrive_identical(  # type: ignore[no-untyped-def]
    mail, mariadb_url, make_gateway, tmp_path
):
    b = make_gateway(
        "gateway-b",
        [("gateway-a", "gateway-a", "TO_A")],
        poll_interval=1,
        partner_extra={"gateway-a": 'format = "pgp"'},  # B's receipts to A go as PGP/MIME
    )
    a = make_gateway(
        "gateway-a",
        [("gateway-b", "gateway-b", "TO_B")],
        database_url=mariadb_url,
        stability_delay=2,
        max_mail_size="128KB",
        poll_interval=1,
        partner_extra={"gateway-b": 'split = "partial"\nformat = "pgp"'},
    )
    a.start()
    sources = make_study(tmp_path / "study", ct=6, mr=4, sc=2, size=256)
    assert storescu(a.port, "TO_B", tmp_path / "study").returncode == 0
    sent = wait_for(lambda: transfers(a, "out", "sent"), 120, 1, "A to send the fragments")
    total = sent[0]["parts_total"]
    assert total >= 6, "a 128KB cap must cut this study into several fragments"
    files = wait_for(lambda: (f := maildir(mail, "gateway-b")) and len(f) == total and f, 60, 0.5, "delivery")
    raw = [f.read_bytes() for f in files]
    assert all(b"message/partial" in r for r in raw)
    for f in files:  # take them out of the mailbox and deliver them again in another order
        f.unlink()
    random.Random(3).shuffle(raw)
    half = len(raw) // 2
    submit_as(a, raw[:half], "gateway-b@" + DOMAIN)
    b.start()
    wait_for(
        lambda: sum(g["have"] for g in status(b)["fragments"]) == half,
        120,
        1,
        "B to hold the first half of the fragments",
    )
    b.kill()  # SIGKILL with half a message on disk
    submit_as(a, raw[half:], "gateway-b@" + DOMAIN)
    b.start()
    wait_for(lambda: transfers(b, "in", "complete"), 180, 1, "B to reassemble after the restart")
    for src in sources:
        assert stored_at(b, src).read_bytes() == stored_at(a, src).read_bytes()
    assert not status(b)["fragments"], "the fragments are gone once the message is stored"
    wait_for(
        lambda: (t := out_transfer(a, "gateway-b")) and t["receipt"] == "confirmed",
        120,
        2,
        "A to receive B's receipt for the reassembled message",
    )
