"""What a receiving gateway refuses, and what it must accept from other S/MIME software (OpenSSL)."""

from __future__ import annotations

import asyncio
import json
import random
import string
import subprocess
import time
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from pathlib import Path

import pytest
from cryptography import x509

from gateway.adapters.pop3 import Pop3Cluster
from gateway.adapters.smtp import SmtpCluster
from gateway.config import load
from gateway.core import mailformat, mime, smime
from gateway.core.queue import QueueState
from gateway.core.smime import Identity
from gateway.devtools.studies import make_study
from gateway.errors import TransientError
from gateway.spool import Spool
from gateway.tls import mail_client_context
from tests.conftest import CANARIES, GatewayProcess, wait_for


def identity(pki_dir: Path, stem: str) -> Identity:
    return Identity.load((pki_dir / f"{stem}.pem").read_bytes(), (pki_dir / f"{stem}.key").read_bytes())


def cert(pki_dir: Path, stem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki_dir / f"{stem}.pem").read_bytes())


def header(set_id: str, part: int = 1, total: int = 1) -> mailformat.MailHeader:
    return mailformat.MailHeader(
        "gateway-a@dicommail.test",
        "gateway-b@dicommail.test",
        "DICOM-eMail",
        f"<{set_id}.{part}@dicommail.test>",
        set_id,
        part,
        total,
        "1.2.3",
        time.time(),
    )


def submit(gw_a_config: Path, data: bytes) -> None:
    """Hand a mail to the cluster as gateway A (real SMTP, client certificate)."""
    settings = load(gw_a_config)
    asyncio.run(
        SmtpCluster(settings.mail, mail_client_context(settings.mail)).send(
            settings.mail.address, "gateway-b@dicommail.test", data
        )
    )


def mails(gw: GatewayProcess) -> dict[str, int]:
    st = json.loads(gw.cli("status", "--json"))
    return {m["state"]: m["count"] for m in st["mails_by_state"] if m["direction"] == "in"}


def test_hostile_mails_are_quarantined_and_the_poller_keeps_going(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")])
    b.start()
    dicom = [p.read_bytes() for p in make_study(tmp_path / "s", ct=2, mr=0, sc=0)]
    b_cert = cert(pki_dir, "gateway-b-smime")

    # 1. signed by a certificate that claims gateway-a's address but comes from the rogue CA
    submit(
        a.config,
        mailformat.build_mail(header("rogue"), dicom[:1], identity(pki_dir, "rogue-gateway-a-smime"), b_cert),
    )
    # 2. encrypted but not signed
    inner = mailformat.build_inner(header("unsigned"), dicom[:1])
    unsigned = mailformat.build_mail(
        header("unsigned"), dicom[:1], identity(pki_dir, "gateway-a-smime"), b_cert
    )
    outer_head = unsigned.split(b"\r\n\r\n", 1)[0]
    submit(a.config, outer_head + b"\r\n\r\n" + mime.b64_lines(smime.encrypt(inner, [b_cert])))
    # 3. properly signed and encrypted, but the part is not DICOM
    submit(
        a.config,
        mailformat.build_mail(
            header("notdicom"),
            [b"MZ\x90\x00 this is not a DICOM file" * 20],
            identity(pki_dir, "gateway-a-smime"),
            b_cert,
        ),
    )
    # 4. signed by gateway-c, a valid certificate of the same CA, but not in B's address book
    submit(
        a.config,
        mailformat.build_mail(header("stranger"), dicom[:1], identity(pki_dir, "gateway-c-smime"), b_cert),
    )

    wait_for(lambda: mails(b).get("quarantined", 0) >= 4, 60, 0.5, "four quarantined mails")
    held = Spool(load(b.config).d_root / "spool" / "inbox", load(b.config).d_root / "tmp").items(
        QueueState.HOLD
    )
    reasons = " | ".join(str(item.meta["reason"]) for item in held)
    assert "not in the address book" in reasons
    assert "not signed" in reasons
    assert "not DICOM" in reasons
    st = json.loads(b.cli("status", "--json"))
    assert st["studies"] == [], "nothing of a refused mail may be ingested"

    # the poller still works: a good mail after the bad ones is ingested
    submit(
        a.config, mailformat.build_mail(header("good"), dicom, identity(pki_dir, "gateway-a-smime"), b_cert)
    )
    wait_for(lambda: mails(b).get("ingested", 0) == 1, 60, 0.5, "the good mail to be ingested")
    assert json.loads(b.cli("status", "--json"))["studies"][0]["instances"] == 2
    # the operator sees the held mails with their reasons, and can release one: it is checked again, and refused again
    listing = b.cli("queue")
    assert "hold" in listing and "not signed" in listing
    unsigned_item = next(item for item in held if "not signed" in str(item.meta["reason"]))
    assert "released" in b.cli("queue", "release", unsigned_item.id)
    spool = Spool(load(b.config).d_root / "spool" / "inbox", load(b.config).d_root / "tmp")

    def held_again() -> bool:
        item = spool.find(unsigned_item.id)
        return item is not None and item.state is QueueState.HOLD and "released" in item.meta

    wait_for(held_again, 30, 0.5, "the released mail to be checked and held again")
    log = b.log.read_bytes() + b.cli("status").encode() + reasons.encode() + listing.encode()
    for canary in CANARIES:  # the refused mails carried canary patient data
        assert canary not in log


def test_rogue_client_certificate_never_gets_in(mail, make_gateway, pki_dir):  # type: ignore[no-untyped-def]
    rogue = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], tls_stem="rogue-gateway-a-tls")
    settings = load(rogue.config)
    tls = mail_client_context(settings.mail)
    with pytest.raises(TransientError) as smtp_err:
        asyncio.run(
            SmtpCluster(settings.mail, tls).send(
                settings.mail.address, "gateway-b@dicommail.test", b"Subject: x\r\n\r\nx\r\n"
            )
        )
    assert (
        "421" in str(smtp_err.value)
        or "closed" in str(smtp_err.value).lower()
        or "disconnect" in str(smtp_err.value).lower()
    )
    assert mail.mailbox_count("gateway-b@dicommail.test") == 0
    with pytest.raises(TransientError) as pop_err:
        asyncio.run(Pop3Cluster(settings.mail, tls).open())
    assert "certificate" in str(pop_err.value).lower()


def test_mail_from_openssl_is_ingested(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """A mail built with `openssl cms -sign` and `openssl cms -encrypt` around DICOM parts."""
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")])
    b.start()
    sources = make_study(tmp_path / "s", ct=3, mr=2, sc=0)
    mixed = MIMEMultipart("mixed")
    for i, p in enumerate(sources, 1):
        part = MIMEApplication(p.read_bytes(), "dicom", name=f"IM{i:06d}.dcm")
        part.set_param("id", f"IM{i:06d}")
        mixed.attach(part)
    del mixed["MIME-Version"]
    (tmp_path / "inner.eml").write_bytes(mixed.as_bytes())
    run = lambda *args: subprocess.run(["openssl", "cms", *args], check=True, capture_output=True, timeout=60)  # noqa: E731
    run(
        "-sign",
        "-in",
        str(tmp_path / "inner.eml"),
        "-signer",
        str(pki_dir / "gateway-a-smime.pem"),
        "-inkey",
        str(pki_dir / "gateway-a-smime.key"),
        "-out",
        str(tmp_path / "signed.eml"),
    )
    run(
        "-encrypt",
        "-aes256",
        "-in",
        str(tmp_path / "signed.eml"),
        "-out",
        str(tmp_path / "mail.eml"),
        "-from",
        "gateway-a@dicommail.test",
        "-to",
        "gateway-b@dicommail.test",
        "-subject",
        "DICOM-eMail",
        str(pki_dir / "gateway-b-smime.pem"),
    )
    submit(a.config, (tmp_path / "mail.eml").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    wait_for(lambda: mails(b).get("ingested", 0) == 1, 60, 0.5, "the OpenSSL mail to be ingested")
    st = json.loads(b.cli("status", "--json"))
    assert st["studies"][0]["instances"] == len(sources)


def test_openssl_decrypts_and_verifies_our_mail(pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    dicom = [p.read_bytes() for p in make_study(tmp_path / "s", ct=2, mr=1, sc=0)]
    data = mailformat.build_mail(
        header("x"), dicom, identity(pki_dir, "gateway-a-smime"), cert(pki_dir, "gateway-b-smime")
    )
    (tmp_path / "m.eml").write_bytes(data)
    subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-in",
            str(tmp_path / "m.eml"),
            "-recip",
            str(pki_dir / "gateway-b-smime.pem"),
            "-inkey",
            str(pki_dir / "gateway-b-smime.key"),
            "-out",
            str(tmp_path / "dec.eml"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    v = subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-in",
            str(tmp_path / "dec.eml"),
            "-CAfile",
            str(pki_dir / "ca.pem"),
            "-out",
            str(tmp_path / "content.eml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert v.returncode == 0 and "Verification successful" in v.stderr, v.stderr
    assert b"application/dicom" in (tmp_path / "content.eml").read_bytes()
    # and with the wrong key, OpenSSL cannot read it
    bad = subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-in",
            str(tmp_path / "m.eml"),
            "-recip",
            str(pki_dir / "gateway-a-smime.pem"),
            "-inkey",
            str(pki_dir / "gateway-a-smime.key"),
        ],
        capture_output=True,
        timeout=60,
    )
    assert bad.returncode != 0


def test_pop3_gives_back_every_mail_byte_for_byte(mail, make_gateway):  # type: ignore[no-untyped-def]
    """Through real Dovecot: dot-stuffed lines come back unstuffed, a mail larger than LIST said (and one with no
    size hint) is read whole, an empty body stays empty."""
    gw = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")])
    settings = load(gw.config)
    rng = random.Random(7)
    lines = [
        "".join(rng.choice(string.ascii_letters + "./+") for _ in range(rng.randint(0, 76)))
        for _ in range(60_000)
    ]
    lines[10:13] = [".", "..", ".leading dot"]  # what POP3 must stuff and we must unstuff
    mails = {
        "dots": ("Subject: dots\r\n\r\n" + "\r\n".join(lines) + "\r\n").encode(),
        "plain": b"Subject: plain\r\n\r\n" + b"QUJD" * 250_000 + b"\r\n",
        "empty": b"Subject: empty\r\n\r\n",
    }
    box = mail.maildirs / "dicommail.test" / "gateway-b" / "new"
    for n, (name, data) in enumerate(mails.items()):
        (box / f"{1700000000 + n}.M{n}P1.{name}").write_bytes(data)

    async def fetch_all() -> dict[bytes, tuple[bytes, bytes]]:
        session = await Pop3Cluster(settings.mail, mail_client_context(settings.mail)).open()
        try:
            got = {}
            for number, _uid, size in await session.list():
                hinted = bytes(await session.retr(number, size))
                unhinted = await session.retr(number, 0)  # grows its buffer as it goes
                low = await session.retr(number, size // 3)  # LIST said less than there is
                assert hinted == unhinted == low
                got[hinted.split(b"\r\n", 1)[0]] = (hinted, low)
            return got
        finally:
            session.abort()

    got = asyncio.run(fetch_all())
    assert sorted(got) == sorted(d.split(b"\r\n", 1)[0] for d in mails.values())
    for data in mails.values():
        assert got[data.split(b"\r\n", 1)[0]][0] == data
