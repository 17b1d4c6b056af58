"""The mailbox is shared and not trusted: attacks against a running gateway, through the real mail cluster.

Unless a test says otherwise, every hostile mail is handed to the cluster from the mailbox account of gateway-c, a
participant of the network with its own client certificate that is *not* the partner it pretends to be. Each test
asserts what the operator sees (status, queue, check_mk, the log) and what the partner sees (receipts).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import sqlite3
import subprocess
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
from cryptography import x509

from gateway.adapters.smtp import SmtpCluster
from gateway.config import load
from gateway.core import mailformat, mdn, mime, pgpmime
from gateway.core.queue import QueueState
from gateway.core.smime import Identity
from gateway.devtools.process import GatewayProcess
from gateway.devtools.studies import make_study
from gateway.fragments import FragmentStore
from gateway.spool import Spool
from gateway.storage import Storage
from gateway.tls import mail_client_context
from gateway.untrusted import holdings
from tests.conftest import CANARIES, storescu, wait_for
from tests.test_disk_full import tmpfs

DOMAIN = "dicommail.test"


def addr(name: str) -> str:
    return f"{name}@{DOMAIN}"


def identity(pki_dir: Path, stem: str) -> Identity:
    return Identity.load((pki_dir / f"{stem}.pem").read_bytes(), (pki_dir / f"{stem}.key").read_bytes())


def cert(pki_dir: Path, stem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki_dir / f"{stem}.pem").read_bytes())


def send_from(account: GatewayProcess, to: str, mails: list[bytes]) -> None:
    """Hand mails to the cluster through `account`'s own login (its client certificate), whatever From: says."""
    settings = load(account.config)

    async def run() -> None:
        smtp = SmtpCluster(settings.mail, mail_client_context(settings.mail))
        for data in mails:
            await smtp.send(settings.mail.address, to, data)

    asyncio.run(run())


def heads(pairs: list[tuple[str, str]]) -> bytes:
    return mime.header_lines(pairs)


def receipt_mail(
    sender: str, to: str, original: str, outcome: str, signer: Identity | None, detail: str = ""
) -> bytes:
    """An MDN as a partner's gateway sends it (signed by `signer`, or not signed at all)."""
    report = mdn.build_report(sender=sender, original_message_id=original, outcome=outcome, detail=detail)
    body = mailformat.build_signed(report, signer) if signer is not None else report
    mid = f"<mdn.{secrets.token_hex(8)}@{DOMAIN}>"
    return heads(mdn.outer_headers(sender, to, "Disposition notification", mid, time.time())) + body


def catalog(gw: GatewayProcess) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{gw.d_root / 'catalog.sqlite'}?mode=ro", uri=True, timeout=30)


def out_transfer(gw: GatewayProcess, partner: str) -> dict | None:  # type: ignore[type-arg]
    found = [
        t
        for t in json.loads(gw.cli("status", "--json"))["transfers"]
        if t["direction"] == "out" and t["partner"] == partner
    ]
    return found[0] if found else None


def check_mk_line(gw: GatewayProcess, service: str) -> str:
    return next(line for line in gw.cli("check-mk").splitlines() if f'"{service}"' in line)


def held(gw: GatewayProcess) -> list:  # type: ignore[type-arg]
    inbox = Spool(gw.d_root / "spool" / "inbox", gw.d_root / "tmp")
    return [
        i for s in (QueueState.HOLD, QueueState.CORRUPT) if inbox.dirs[s].exists() for i in inbox.items(s)
    ]


def test_only_the_partners_signed_receipt_counts(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """Forged, unsigned, look-alike, cross-partner and unknown-mail receipts leave the transfer as it was; the
    partner's own receipt confirms it; a later contradicting receipt is shown beside it and changes nothing."""
    a = make_gateway(
        "gateway-a",
        [("gateway-b", "gateway-b", "TO_B"), ("gateway-c", "gateway-c", "TO_C")],
        poll_interval=1,
        stability_delay=1,
    )
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    attacker = make_gateway("gateway-c", [("gateway-a", "gateway-a", "TO_A")])  # its mailbox login only
    a.start()
    make_study(tmp_path / "s", ct=2, mr=0, sc=0)
    assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0
    sent = wait_for(
        lambda: (t := out_transfer(a, "gateway-b")) and t["state"] == "sent" and t, 120, 0.5, "sent"
    )
    assert sent["receipt"] == "awaited"
    with catalog(a) as db:
        (mid,) = db.execute("SELECT mdn_id FROM mails WHERE transfer_id = ?", (sent["id"],)).fetchone()
    b_key, c_key = identity(pki_dir, "gateway-b-smime"), identity(pki_dir, "gateway-c-smime")
    forged = [
        receipt_mail(addr("gateway-b"), addr("gateway-a"), mid, mdn.OK, None),  # unsigned
        receipt_mail(
            addr("gateway-b"), addr("gateway-a"), mid, mdn.OK, identity(pki_dir, "rogue-gateway-b-smime")
        ),
        receipt_mail(
            addr("gateway-c"), addr("gateway-a"), mid, mdn.OK, c_key
        ),  # a real partner, not this one's
        receipt_mail(addr("gateway-b"), addr("gateway-a"), f"<never.sent@{DOMAIN}>", mdn.OK, b_key),
    ]
    send_from(attacker, addr("gateway-a"), forged)
    found = wait_for(lambda: len(held(a)) >= 4 and held(a), 90, 0.5, "four receipts set aside")
    reasons = " | ".join(str(i.meta["reason"]) for i in found)
    assert "not signed" in reasons and "names no mail we sent to gateway-b" in reasons, reasons
    assert "names no mail we sent to gateway-c" in reasons, reasons  # cross-partner
    assert not any(i.meta.get("authenticated") for i in found if "not signed" in i.meta["reason"])
    assert out_transfer(a, "gateway-b")["receipt"] == "awaited", "no forged receipt may confirm a transfer"
    assert "0 confirmed" in check_mk_line(a, "DMG Receipts")

    # the partner itself answers: now, and only now, the transfer is confirmed
    b.start()
    wait_for(lambda: out_transfer(a, "gateway-b")["receipt"] == "confirmed", 180, 1, "B's signed receipt")
    # a replayed receipt of the partner's (once genuinely sent) saying something else: shown, never applied
    send_from(
        attacker,
        addr("gateway-a"),
        [
            receipt_mail(addr("gateway-b"), addr("gateway-a"), mid, mdn.OK, b_key),  # a plain replay
            receipt_mail(addr("gateway-b"), addr("gateway-a"), mid, mdn.FAILED, b_key, "refused"),
        ],
    )
    t = wait_for(
        lambda: (t := out_transfer(a, "gateway-b")) and t["receipt_conflict"] and t, 90, 0.5, "conflict"
    )
    assert t["receipt"] == "confirmed", "a final answer stands"
    assert "later receipt says deleted" in t["receipt_conflict"]
    assert "CONTRADICTED" in a.cli("status")
    line = check_mk_line(a, "DMG Receipts")
    assert line.startswith("2 ") and "1 contradicted" in line, line


def fill(seed: int, size: int) -> bytes:
    """`size` bytes of base64 lines (what an encrypted mail body looks like)."""
    return mime.b64_lines(secrets.token_bytes(size * 3 // 4 - 64) + seed.to_bytes(8, "big"))


def junk_smime(sender: str, n: int, size: int) -> bytes:
    """Looks like an S/MIME mail from `sender`, is noise: cannot be decrypted."""
    return (
        heads(
            [
                ("From", sender),
                ("To", addr("gateway-b")),
                ("Subject", "DICOM-eMail"),
                ("Message-ID", f"<flood.{n}.{secrets.token_hex(4)}@{DOMAIN}>"),
                ("MIME-Version", "1.0"),
                ("Content-Type", 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'),
                ("Content-Transfer-Encoding", "base64"),
            ]
        )
        + b"\r\n"
        + fill(n, size)
    )


def junk_fragment(sender: str, n: int, size: int) -> bytes:
    """Fragment 1 of 5 of a message that never comes whole."""
    return (
        heads(
            [
                ("From", sender),
                ("To", addr("gateway-b")),
                ("Subject", "DICOM-eMail (1/5)"),
                ("Message-ID", f"<1.frag{n}@{DOMAIN}>"),
                ("MIME-Version", "1.0"),
                ("Content-Type", f'message/partial; id="frag{n}.{secrets.token_hex(4)}"; number=1; total=5'),
            ]
        )
        + b"\r\n"
        + fill(n, size)
    )


@pytest.fixture
def small_d(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield from tmpfs(tmp_path / "d-volume", "size=120m")


def test_a_flood_bigger_than_the_disk_leaves_reception_up(mail, make_gateway, pki_dir, tmp_path, small_d):  # type: ignore[no-untyped-def]
    """About 200 MB of unauthenticated mail and fragment groups, from a forged partner address and from strangers,
    against a D: with 104 MB above its reserve: the quotas hold, the oldest unauthenticated bytes go first (their
    records stay), check_mk alerts, a mail above the fetch limit costs only its headers, and C-STORE still works."""
    mb = 1024 * 1024
    b = make_gateway(
        "gateway-b",
        [("gateway-a", "gateway-a", "TO_A")],
        poll_interval=1,
        d_root=small_d / "d",
        min_free="16MB",
        mail_extra=(
            'max_fetch_size = "3MB"\nmax_inbox_backlog = "12MB"\n'
            'untrusted_quota = "24MB"\nuntrusted_quota_per_sender = "10MB"'
        ),
    )
    attacker = make_gateway("gateway-c", [("gateway-b", "gateway-b", "TO_B")])
    b.start()
    flood = [junk_smime(addr("gateway-a"), n, 2 * mb) for n in range(35)]
    flood += [junk_smime(f"stranger{n % 4}@evil.test", 100 + n, 2 * mb) for n in range(20)]
    flood += [junk_fragment(addr("gateway-a"), 200 + n, 2 * mb) for n in range(30)]
    flood += [junk_smime(addr("gateway-a"), 999, 5 * mb)]  # above the fetch limit
    assert sum(map(len, flood)) > 170 * mb > Storage(small_d).free_bytes() - 16 * mb
    send_from(attacker, addr("gateway-b"), flood)
    # Postfix hands the mails to Dovecot after it accepted them: an empty mailbox alone may come before the last
    # one (the large one) was even delivered, so B must also have dealt with that one
    wait_for(
        lambda: (
            mail.mailbox_count(addr("gateway-b")) == 0 and any(i.meta.get("headers_only") for i in held(b))
        ),
        300,
        1,
        "B to work through the flood, the mail above the fetch limit included",
    )
    wait_for(
        lambda: not Spool(b.d_root / "spool" / "inbox", b.d_root / "tmp").due(time.time()), 120, 1, "ingest"
    )

    storage = Storage(b.d_root)
    inbox, fragments = Spool(storage.inbox, storage.tmp), FragmentStore.of(storage)
    kept = holdings(inbox, fragments)
    by_sender: dict[str, int] = {}
    for h in kept:
        by_sender[h.sender] = by_sender.get(h.sender, 0) + h.size
    assert sum(by_sender.values()) <= 24 * mb, by_sender
    assert max(by_sender.values()) <= 10 * mb, by_sender
    assert Storage(small_d).free_bytes() > 16 * mb, "D: stays above its reserve"
    items = held(b)
    dropped = [i for i in items if i.meta.get("content_dropped")]
    assert len(dropped) > 20 and all(not (i.path / "mail.eml").exists() for i in dropped)
    assert all(i.meta.get("reason") for i in dropped), "a dropped mail keeps its record and reason"
    assert sum(1 for g in fragments.groups() if g.dropped) > 10
    large = [i for i in items if i.meta.get("headers_only")]
    assert len(large) == 1 and "larger than the fetch limit" in large[0].meta["reason"]
    assert (large[0].path / "mail.eml").stat().st_size < 64 * 1024
    quarantine = check_mk_line(b, "DMG Quarantine")
    assert quarantine.startswith("2 ") and "dropped" in quarantine, quarantine

    # reception is up: a modality's study is stored
    make_study(tmp_path / "s", ct=3, mr=0, sc=0)
    r = storescu(b.port, "GATEWAY_B", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(b.cli("status", "--json"))["studies"]) == 1


def test_poison_mails_affect_only_themselves(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """A mail the server cannot hand out, a mail above the fetch limit and a partner's mail with a folded
    Message-ID come first; the study and the receipts behind them go through, and the unfetchable one is
    reported, not retried forever."""
    a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], poll_interval=1, stability_delay=1)
    b = make_gateway(
        "gateway-b",
        [("gateway-a", "gateway-a", "TO_A")],
        poll_interval=1,
        mail_extra='max_fetch_size = "4MB"',
    )
    attacker = make_gateway("gateway-c", [("gateway-b", "gateway-b", "TO_B")])
    box = mail.maildirs / DOMAIN / "gateway-b" / "new"
    box.mkdir(parents=True, exist_ok=True)
    # 1. the server cannot read this one (as a damaged or mis-owned maildir file): RETR answers -ERR
    text = b"Subject: poison\r\n\r\nthe server cannot read me\r\n"
    poison = box / f"1700000000.M1P1.poison,S={len(text)},W={len(text)}:2,"  # sizes in the name: LIST works
    poison.write_bytes(text)
    os.chown(poison, 8, 8)  # the mail user, as Dovecot delivers
    os.chmod(poison, 0)
    # 2. above the fetch limit
    big = junk_smime(addr("gateway-a"), 1, 6 * 1024 * 1024)
    # 3. a genuine partner mail whose Message-ID header is folded, asking for a receipt
    dicom = [p.read_bytes() for p in make_study(tmp_path / "f", ct=1, mr=0, sc=0)]
    header = mailformat.MailHeader(
        addr("gateway-a"), addr("gateway-b"), "DICOM-eMail", f"<folded.1@{DOMAIN}>", "folded", 1, 1, "1.2.3",
        time.time(), notify=addr("gateway-a"),
    )  # fmt: skip
    folded = mailformat.build_mail(
        header, dicom, identity(pki_dir, "gateway-a-smime"), cert(pki_dir, "gateway-b-smime")
    )
    folded = folded.replace(b"Message-ID: <folded.1@", b"Message-ID:\r\n <folded.1@", 1)
    send_from(attacker, addr("gateway-b"), [big, folded])
    b.start()
    a.start()
    make_study(tmp_path / "s", ct=2, mr=0, sc=0)
    assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0
    wait_for(
        lambda: (t := out_transfer(a, "gateway-b")) and t["receipt"] == "confirmed",
        180,
        1,
        "A's study confirmed",
    )
    with catalog(b) as db:
        rows = db.execute("SELECT original_message_id, state FROM receipts_out").fetchall()
    assert (f"<folded.1@{DOMAIN}>", "sent") in rows or any(
        m == f"<folded.1@{DOMAIN}>" and s in ("queued", "sent") for m, s in rows
    ), rows
    assert any("larger than the fetch limit" in str(i.meta["reason"]) for i in held(b))
    stages = wait_for(
        lambda: "cannot be fetched" in (line := check_mk_line(b, "DMG Pipeline stages")) and line,
        60,
        1,
        "report",
    )
    assert stages.startswith("1 "), stages
    left = [f for sub in ("new", "cur") for f in (box.parent / sub).glob("1700000000.M1P1.poison*")]
    assert left, "a mail that cannot be fetched stays on the server for the mail operator"
    assert b.log.read_text().count("could not be fetched") == 3, "tried three times, then only reported"


def test_an_openpgp_compression_bomb_is_refused_in_bounded_memory(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """Signed with the partner's real key, 1 GiB of zeros compressed into ~1 MB: gpg stops at the output limit
    (`max_unpacked_size`, here 64 MB), writing into a file, never a pipe we collect: the gateway's peak memory
    grows by less than 32 MB (measured: 8 MB)."""
    b = make_gateway(
        "gateway-b",
        [("gateway-a", "gateway-a", "TO_A")],
        poll_interval=1,
        mail_extra='max_unpacked_size = "64MB"',
        partner_extra={"gateway-a": 'format = "pgp"'},
    )
    attacker = make_gateway("gateway-c", [("gateway-b", "gateway-b", "TO_B")])
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--batch", "--homedir", str(home), "--trust-model", "always"]
    for key in ("gateway-a-pgp.sec.asc", "gateway-b-pgp.pub.asc"):
        subprocess.run([*gpg, "--import", str(pki_dir / key)], check=True, capture_output=True, timeout=60)
    a_fpr, b_fpr = addr("gateway-a"), addr("gateway-b")  # the keys' user ids
    bomb = subprocess.run(
        f"head -c 1073741824 /dev/zero | {' '.join(gpg)} -z 9 --armor --local-user {a_fpr} -r {b_fpr} --sign --encrypt",
        shell=True,
        capture_output=True,
        check=True,
        timeout=300,
    ).stdout
    assert len(bomb) < 8 * 1024 * 1024
    entity = pgpmime.encrypted_entity(b"", lambda _: bomb)
    raw = (
        heads(
            [
                ("From", addr("gateway-a")),
                ("To", addr("gateway-b")),
                ("Subject", "DICOM-eMail"),
                ("Message-ID", f"<bomb.1@{DOMAIN}>"),
                ("MIME-Version", "1.0"),
            ]
        )
        + entity
    )
    b.start()
    assert b.proc is not None
    status = Path(f"/proc/{b.proc.pid}/status")
    before = int(next(x for x in status.read_text().splitlines() if x.startswith("VmHWM")).split()[1]) * 1024
    send_from(attacker, addr("gateway-b"), [raw])
    item = wait_for(lambda: held(b), 240, 1, "the bomb to be refused")[0]
    assert "compression bomb" in item.meta["reason"], item.meta["reason"]
    assert item.meta["authenticated"] is False
    after = int(next(x for x in status.read_text().splitlines() if x.startswith("VmHWM")).split()[1]) * 1024
    growth = after - before
    print(f"gateway peak memory: {before / 1e6:.0f} MB before, {after / 1e6:.0f} MB after the bomb")
    assert growth < 32 * 1024 * 1024, f"peak grew by {growth / 1e6:.0f} MB"


def altered(raw: bytes) -> bytes:
    """A relay garbles 40 bytes in the middle of the encrypted body (valid base64, wrong bytes)."""
    data = bytearray(raw)
    start = data.index(b"\n", len(data) // 2) + 1
    data[start : start + 40] = bytes(
        ord("A") if c != ord("A") else ord("B") for c in data[start : start + 40]
    )
    return bytes(data)


def _zip_with_patient_names(dicom: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("DICOM/CANARYZQX_PATIENTJWV_19230417.dcm", dicom)
        zf.writestr("../CANARYZQX_PATIENTJWV.dcm", dicom)  # unsafe: refused, and its name never quoted
    return buf.getvalue()


def test_refusals_carry_no_exception_text_and_no_patient_data(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """The canary study through every refusal path: what the partner is told is a fixed phrase; no archive entry
    name, element value or exception text reaches a receipt, a log line, the catalog, status or check_mk."""
    make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")])  # not started: its mailbox keeps B's MDNs
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1, web_port=0)
    attacker = make_gateway("gateway-c", [("gateway-b", "gateway-b", "TO_B")])
    files = make_study(tmp_path / "s", ct=2, mr=0, sc=0)
    dicom = files[0].read_bytes()
    a_key, b_cert = identity(pki_dir, "gateway-a-smime"), cert(pki_dir, "gateway-b-smime")

    def header(n: int) -> mailformat.MailHeader:
        return mailformat.MailHeader(
            addr("gateway-a"), addr("gateway-b"), "DICOM-eMail", f"<refuse.{n}@{DOMAIN}>", f"refuse{n}", 1, 1,
            "1.2.3", time.time(), notify=addr("gateway-a"),
        )  # fmt: skip

    # a DICOM part whose UIDs carry patient data: pydicom warns quoting them, we refuse without quoting
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = "CANARYZQX.PATIENTJWV.19230417"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    bad_uid = io.BytesIO()
    ds.save_as(bad_uid, enforce_file_format=True)
    mails = [
        # an archive with patient names as entry names, one of them unsafe
        mailformat.wrap_smime(header(1), mailformat.build_inner_zip(header(1), _zip_with_patient_names(dicom)), a_key, b_cert),
        mailformat.build_mail(header(2), [bad_uid.getvalue()], a_key, b_cert),
        # encrypted for someone else: cannot be decrypted (the oracle case)
        mailformat.build_mail(header(3), [dicom], a_key, cert(pki_dir, "gateway-c-smime")),
        # the signature does not match the content (altered)
        altered(mailformat.build_mail(header(4), [dicom], a_key, b_cert)),
    ]  # fmt: skip
    send_from(attacker, addr("gateway-b"), mails)
    b.start()
    wait_for(lambda: len(held(b)) >= 4, 120, 0.5, "four refusals")
    wait_for(lambda: mail.mailbox_count(addr("gateway-a")) >= 4, 120, 0.5, "B's four refusal receipts at A")
    box = mail.maildirs / DOMAIN / "gateway-a"
    receipts = [f.read_bytes() for sub in ("new", "cur") for f in (box / sub).glob("*")]
    told = set()
    for raw in receipts:
        entity = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else raw.split(b"\n\n", 1)[1]
        _, content = mailformat.unwrap_signed(
            heads([(k, v) for k, v in mime.parse_head(raw).items() if k.lower().startswith("content-")])
            + b"\r\n"
            + entity,
            [b_cert],
        )
        told.add(mdn.read_report(content).detail)
    allowed = {"not processed: could not be decrypted or its signature verified", "not processed: not DICOM",
               "not processed: malformed mail"}  # fmt: skip
    assert told <= allowed, told
    reasons = " | ".join(str(i.meta["reason"]) for i in held(b))
    with catalog(b) as db:
        dump = "\n".join(db.iterdump())
    seen = b"\n".join(
        [
            b.log.read_bytes(),
            b.cli("status").encode(),
            b.cli("status", "--json").encode(),
            b.cli("queue").encode(),
            b.cli("check-mk").encode(),
            dump.encode(),
            reasons.encode(),
            *receipts,
        ]
    )
    for canary in CANARIES:
        assert canary not in seen, canary
    assert b"Traceback" not in b"".join(receipts)


def test_send_beside_a_running_gateway_loses_nothing(mail, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    """`dicom-mail-gateway send` while a modality is sending: every instance the modality sent is stored (the
    command no longer empties D:/tmp under the running gateway's associations)."""
    gw = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=60)
    gw.start()
    study = make_study(tmp_path / "s", ct=40, mr=20, sc=0, size=256)
    extra = make_study(tmp_path / "m", ct=2, mr=0, sc=0)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        modality = pool.submit(storescu, gw.port, "GATEWAY_A", tmp_path / "s")
        sends = 0
        while not modality.done() and sends < 20:
            gw.cli("send", "--to", "gateway-b", str(extra[0]))
            sends += 1
        result = modality.result(timeout=300)
    assert sends >= 1
    assert result.returncode == 0, result.stderr
    with catalog(gw) as db:
        stored = {r[0] for r in db.execute("SELECT sop_uid FROM instances")}
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study}
    assert sent <= stored, f"{len(sent - stored)} acknowledged instances are missing"


def test_a_stage_stuck_with_work_turns_healthz_and_check_mk_red(mail, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    """A PACS that accepts the connection and never answers holds the forwarder: after `stage_stall` seconds
    with work and no progress, /healthz answers 503 naming the stage and check_mk is CRIT."""
    import socket
    import urllib.error
    import urllib.request

    from tests.ports import free_port

    hung = socket.create_server(("127.0.0.1", 0))
    web_port = free_port()
    a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1)
    b = make_gateway(
        "gateway-b",
        [("gateway-a", "gateway-a", "TO_A")],
        poll_interval=1,
        web_port=web_port,
        tail=(
            '[monitoring]\nstage_stall = 4\n\n[[pacs]]\nname = "hung"\nhost = "127.0.0.1"\n'
            f'port = {hung.getsockname()[1]}\nae_title = "HUNG"\ncalling_ae = "GATEWAY_B"\n'
        ),
    )
    try:
        b.start()
        a.start()
        make_study(tmp_path / "s", ct=1, mr=0, sc=0)
        assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0

        def healthz() -> tuple[int, dict]:  # type: ignore[type-arg]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        _code, body = wait_for(
            lambda: (h := healthz())[0] == 503 and h, 180, 1, "/healthz to report the stall"
        )
        assert body["stalled"] == ["forwarder"], body
        line = wait_for(
            lambda: "forwarder" in (x := check_mk_line(b, "DMG Pipeline stages")) and x, 30, 1, "CRIT"
        )
        assert line.startswith("2 "), line
    finally:
        hung.close()


def test_an_item_that_raises_is_set_aside_and_the_stage_goes_on(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """An injected fault a real database cannot be made to show on demand: a trigger refuses to record one mail
    as ingested (a constraint error, not a lost connection). The mail is set aside as corrupt with its
    traceback, check_mk alerts, and the mail behind it is ingested: no stage retries one item forever."""
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    sender = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")])  # A's own account and keys
    b.start()
    db = sqlite3.connect(b.d_root / "catalog.sqlite", timeout=30)
    db.execute(
        "CREATE TRIGGER injected_fault BEFORE UPDATE ON mails WHEN NEW.state = 'ingested' "
        "AND NEW.transfer_id LIKE '%poisonset%' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    )
    db.commit()
    db.close()
    dicom = [p.read_bytes() for p in make_study(tmp_path / "s", ct=2, mr=0, sc=0)]
    a_key, b_cert = identity(pki_dir, "gateway-a-smime"), cert(pki_dir, "gateway-b-smime")

    def mail_of(set_id: str, parts: list[bytes]) -> bytes:
        header = mailformat.MailHeader(
            addr("gateway-a"), addr("gateway-b"), "DICOM-eMail", f"<{set_id}.1@{DOMAIN}>", set_id, 1, 1, "1.2.3",
            time.time(),
        )  # fmt: skip
        return mailformat.build_mail(header, parts, a_key, b_cert)

    send_from(sender, addr("gateway-b"), [mail_of("poisonset", dicom[:1]), mail_of("goodset", dicom[1:])])
    inbox = Spool(b.d_root / "spool" / "inbox", b.d_root / "tmp")
    bad = wait_for(lambda: inbox.items(QueueState.CORRUPT), 90, 0.5, "the failing mail to be set aside")[0]
    assert "internal error" in bad.meta["reason"] and "injected fault" in bad.meta["traceback"]
    wait_for(
        lambda: any(
            t["id"] == "gateway-a:goodset" for t in json.loads(b.cli("status", "--json"))["transfers"]
        ),
        90,
        0.5,
        "the next mail to be ingested",
    )
    line = check_mk_line(b, "DMG Quarantine")
    assert line.startswith("2 ") and "internal error" in line, line
