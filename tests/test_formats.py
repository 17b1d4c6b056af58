"""Every partner format against the real tools, without the mail cluster: GnuPG both ways, OpenSSL, unzip and
dcmdump for DICOM-ZIP, hostile archives, message/partial reassembly, receipts, compression, the address book."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import random
import subprocess
import time
import zipfile
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from email.policy import compat32
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.adapters.openpgp import OpenPgp
from gateway.core import (
    cmsstream,
    compress,
    dicomzip,
    mailformat,
    mailstream,
    mdn,
    mime,
    partial,
    pgpmime,
    smime,
)
from gateway.core.inbound import Accepted, ReceiptIn, Refused, Sender, inspect_mail
from gateway.core.smime import Identity, SmimeError
from gateway.devtools import pki
from gateway.devtools.studies import make_study
from gateway.errors import ConfigError
from tests.conftest import wait_for

A, B = "gateway-a@dicommail.test", "gateway-b@dicommail.test"


def identity(pki_dir: Path, stem: str) -> Identity:
    return Identity.load((pki_dir / f"{stem}.pem").read_bytes(), (pki_dir / f"{stem}.key").read_bytes())


def cert(pki_dir: Path, stem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki_dir / f"{stem}.pem").read_bytes())


def header(
    set_id: str = "t1", part: int = 1, total: int = 1, subject: str = "DICOM-eMail"
) -> mailformat.MailHeader:
    return mailformat.MailHeader(
        A, B, subject, f"<{set_id}.{part}@dicommail.test>", set_id, part, total, "1.2.3", time.time(), A
    )


@pytest.fixture(scope="module")
def keyrings(pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenPgp, OpenPgp]]:
    """Gateway A's and B's own keyrings, as the gateway builds them (own secret key + the partner's key)."""
    root = tmp_path_factory.mktemp("gnupg")
    a = OpenPgp.rebuild(root / "a", pki_dir / "gateway-a-pgp.sec.asc", [pki_dir / "gateway-b-pgp.pub.asc"])
    b = OpenPgp.rebuild(root / "b", pki_dir / "gateway-b-pgp.sec.asc", [pki_dir / "gateway-a-pgp.pub.asc"])
    yield a, b
    a.close()
    b.close()


def book_of_b(pki_dir: Path, a_pgp: OpenPgp) -> dict[str, Sender]:
    return {A: Sender("gateway-a", (cert(pki_dir, "gateway-a-smime"),), a_pgp.own_fingerprint)}


def gpg(home: Path, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args],
        input=data,
        capture_output=True,
        timeout=60,
    )


_PLAIN_HOMES: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _stop_plain_agents() -> Iterator[None]:
    """The partner-side GnuPG homes start agents of their own; stop them after the module."""
    yield
    for home in _PLAIN_HOMES:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, timeout=10
        )


def plain_keyring(tmp_path: Path, pki_dir: Path, secret: str, public: str) -> Path:
    """A plain GnuPG home as a partner's own software would have it."""
    home = tmp_path / f"gpg-{secret}"
    home.mkdir(mode=0o700, parents=True)
    _PLAIN_HOMES.append(home)
    for f in (pki_dir / f"{secret}-pgp.sec.asc", pki_dir / f"{public}-pgp.pub.asc"):
        assert gpg(home, "--import", str(f)).returncode == 0
    return home


# ------------------------------------------------------------------------------------------- PGP/MIME


def test_gpg_decrypts_and_verifies_what_we_send(pki_dir, tmp_path, keyrings):  # type: ignore[no-untyped-def]
    a, b = keyrings
    files = [p.read_bytes() for p in make_study(tmp_path / "s", ct=3, mr=1, sc=1)]
    raw = pgpmime.wrap_pgp(
        header(), mailformat.build_inner(header(), files), lambda d: a.sign_encrypt(d, b.own_fingerprint)
    )
    msg = message_from_bytes(raw, policy=compat32)
    assert msg.get_content_type() == "multipart/encrypted"
    assert msg.get_param("protocol") == "application/pgp-encrypted"
    control, payload = msg.get_payload()
    assert control.get_content_type() == "application/pgp-encrypted" and "Version: 1" in control.get_payload()
    assert msg["X-TELEMEDICINE-SETID"] == "t1" and msg["Disposition-Notification-To"] == A
    assert msg["Subject"] == "DICOM-eMail"
    # GnuPG 2.2 as a partner runs it: B's secret key, A's public key
    home = plain_keyring(tmp_path, pki_dir, "gateway-b", "gateway-a")
    out = gpg(home, "--status-fd", "2", "--decrypt", data=payload.get_payload().encode())
    assert out.returncode == 0, out.stderr.decode()
    assert b"GOODSIG" in out.stderr and b"GOODMDC" in out.stderr
    assert a.own_fingerprint.encode() in out.stderr  # VALIDSIG names the signing key
    inner = message_from_bytes(out.stdout, policy=compat32)
    parts = [p for p in inner.walk() if p.get_content_type() == "application/dicom"]
    assert [p.get_payload(decode=True) for p in parts] == files
    assert all(p.get_param("name", header="content-type").endswith(".dcm") for p in parts)
    assert inner["X-TELEMEDICINE-STUDYID"] == "1.2.3" and inner["X-TELEMEDICINE-SETTOTAL"] == "1"


def git_style_mail(tmp_path: Path, pki_dir: Path, dicom: bytes, part: int, total: int) -> bytes:
    """A PGP/MIME mail the way an @GIT sender makes it: one file per mail, gpg --sign --encrypt --armor."""
    entity = (
        b'Content-Type: application/dicom; name="IMG0001.dcm"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"X-TELEMEDICINE-STUDYID: 1.2.3.4\r\n"
        b"X-TELEMEDICINE-SETID: gitset1\r\n"
        + f"X-TELEMEDICINE-SETPART: {part}\r\nX-TELEMEDICINE-SETTOTAL: {total}\r\n\r\n".encode()
        + mime.b64_lines(dicom)
    )
    home = plain_keyring(tmp_path, pki_dir, "gateway-a", "gateway-b")
    enc = gpg(
        home, "--trust-model", "always", "--sign", "--encrypt", "--armor", "-r", B, "-u", A, data=entity
    )
    assert enc.returncode == 0, enc.stderr.decode()
    boundary = "git-boundary-1"
    return (
        (
            f"From: {A}\r\nTo: {B}\r\nSubject: DICOM-eMail\r\nMessage-ID: <git{part}@dicommail.test>\r\n"
            f"MIME-Version: 1.0\r\nX-TELEMEDICINE-SETID: gitset1\r\nX-TELEMEDICINE-SETPART: {part}\r\n"
            f"X-TELEMEDICINE-SETTOTAL: {total}\r\nDisposition-Notification-To: {A}\r\n"
            f'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + enc.stdout.replace(b"\n", b"\r\n")
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_a_gpg_made_git_mail_is_accepted(pki_dir, tmp_path, keyrings):  # type: ignore[no-untyped-def]
    a, b = keyrings
    files = make_study(tmp_path / "s", ct=2, mr=0, sc=0)
    for part, f in enumerate(files, start=1):
        got = inspect_mail(
            git_style_mail(tmp_path / f"m{part}", pki_dir, f.read_bytes(), part, len(files)),
            identity(pki_dir, "gateway-b-smime"),
            book_of_b(pki_dir, a),
            b,
        )
        assert isinstance(got, Accepted)
        assert got.transfer_id == "gateway-a:gitset1" and (got.part, got.total) == (part, 2)
        assert [d for _, d in got.parts] == [f.read_bytes()]


def test_pgp_mail_signed_by_another_key_or_not_for_us_is_refused(pki_dir, tmp_path, keyrings):  # type: ignore[no-untyped-def]
    a, b = keyrings
    files = [make_study(tmp_path / "s", ct=1, mr=0, sc=0)[0].read_bytes()]
    raw = pgpmime.wrap_pgp(
        header(), mailformat.build_inner(header(), files), lambda d: a.sign_encrypt(d, b.own_fingerprint)
    )
    me = identity(pki_dir, "gateway-b-smime")
    wrong = {A: Sender("gateway-a", (), "0" * 40)}
    with pytest.raises(Refused, match="other than the partner"):
        inspect_mail(raw, me, wrong, b)
    with pytest.raises(Refused, match="not encrypted to this gateway"):
        inspect_mail(raw, me, book_of_b(pki_dir, a), a)  # A cannot decrypt what it encrypted to B
    tampered = raw.replace(
        b"-----BEGIN PGP MESSAGE-----\r\n\r\n", b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQ", 1
    )
    with pytest.raises(Refused):
        inspect_mail(tampered, me, book_of_b(pki_dir, a), b)


def gnupg_pids() -> dict[int, list[bytes]]:
    """Every running gpg and gpg-agent, with its command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and Path(argv[0].decode(errors="replace")).name in ("gpg", "gpg-agent"):
                found[int(entry.name)] = argv
    return found


def test_a_restart_retires_the_keyring_a_killed_gateway_left(pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """A SIGKILLed gateway leaves its gpg-agent and maybe a gpg mid-operation; the next start must not trip on them.

    CI once saw a restart die in the old keyring's removal: the agent noticed its socket go and removed its other
    sockets under the remover's feet. Each start now builds its own keyring and stops the old one's processes.
    """
    root = tmp_path / "state" / "gnupg"
    sec, pub = pki_dir / "gateway-a-pgp.sec.asc", [pki_dir / "gateway-b-pgp.pub.asc"]
    before = set(gnupg_pids())
    old = OpenPgp.rebuild(root, sec, pub)
    signature = old.sign_detached(b"study")  # starts the old keyring's agent
    home = old._gpg.gnupghome
    stuck = subprocess.Popen(  # a gpg whose gateway died while it ran: it still waits for its input
        ["gpg", "--homedir", home, "--batch", "--decrypt"], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: stuck.pid in gnupg_pids(), 10, 0.05, "the stuck gpg to start")
        left = {pid for pid, argv in gnupg_pids().items() if home.encode() in argv} - before
        assert stuck.pid in left and len(left) >= 2, left  # the agent and the stuck gpg
        new = OpenPgp.rebuild(root, sec, pub)  # what the next start does; the old object is never closed
        assert stuck.wait(timeout=10) != 0
        still = set(gnupg_pids())
        assert not left & still, "the old keyring's processes outlived the restart"
        assert [p.name for p in root.iterdir()] == [new.home.name] and new.home != old.home
        assert new.verify_detached(b"study", signature) == new.own_fingerprint
        assert new.verify_detached(b"study", new.sign_detached(b"study")) == new.own_fingerprint
        new.close()
        assert not new.home.exists()
        assert not {pid for pid, argv in gnupg_pids().items() if new._gpg.gnupghome.encode() in argv}
    finally:
        stuck.kill()
        stuck.wait()


# ------------------------------------------------------------------------------------------- DICOM-ZIP


def openssl_opens(raw: bytes, pki_dir: Path, tmp_path: Path) -> Message:
    """`openssl cms -decrypt` as B, then `-verify` against the test CA: the signed content OpenSSL finds."""
    (tmp_path / "m.eml").write_bytes(raw)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=60)  # noqa: E731
    run(
        "openssl", "cms", "-decrypt", "-in", str(tmp_path / "m.eml"), "-recip", str(pki_dir / "gateway-b-smime.pem"),
        "-inkey", str(pki_dir / "gateway-b-smime.key"), "-out", str(tmp_path / "dec.eml"),
    )  # fmt: skip
    run(
        "openssl", "cms", "-verify", "-in", str(tmp_path / "dec.eml"), "-CAfile", str(pki_dir / "ca.pem"),
        "-out", str(tmp_path / "content.eml"),
    )  # fmt: skip
    return message_from_bytes((tmp_path / "content.eml").read_bytes(), policy=compat32)


def test_smime_zip_passes_openssl_unzip_and_dcmdump(pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    files = [p.read_bytes() for p in make_study(tmp_path / "s", ct=4, mr=2, sc=1)]
    h = header(subject="DICOM-eMail DICOM-ZIP")
    inner = mailformat.build_inner_zip(h, dicomzip.build_zip(files, deflate=True))
    raw = mailformat.wrap_smime(
        h, inner, identity(pki_dir, "gateway-a-smime"), cert(pki_dir, "gateway-b-smime")
    )
    content = openssl_opens(raw, pki_dir, tmp_path)
    zips = [p for p in content.walk() if p.get_content_type() == "application/zip"]
    assert (
        len(zips) == 1 and zips[0].get_param("name") == "DICOM.ZIP" and zips[0].get_param("id") == "DICOM.ZIP"
    )
    assert "DICOM-ZIP" in message_from_bytes(raw, policy=compat32)["Subject"]
    (tmp_path / "DICOM.ZIP").write_bytes(zips[0].get_payload(decode=True))
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=60)  # noqa: E731
    assert b"No errors detected" in run("unzip", "-t", str(tmp_path / "DICOM.ZIP")).stdout
    (tmp_path / "x").mkdir()
    run("unzip", "-q", str(tmp_path / "DICOM.ZIP"), "-d", str(tmp_path / "x"))
    dump = run("dcmdump", str(tmp_path / "x" / "DICOMDIR")).stdout.decode()
    assert dump.count("ReferencedFileID") == len(files) and "IMAGE" in dump
    got = inspect_mail(
        raw, identity(pki_dir, "gateway-b-smime"), {A: Sender("a", (cert(pki_dir, "gateway-a-smime"),))}
    )
    assert isinstance(got, Accepted) and sorted(d for _, d in got.parts) == sorted(files)


def _zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def _dicomdir_to(target: str) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.99"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    record = Dataset()
    record.DirectoryRecordType = "IMAGE"
    record.ReferencedFileID = target.split("/")
    ds.DirectoryRecordSequence = Sequence([record])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_hostile_archives_are_refused_with_the_reason(pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    dicom = make_study(tmp_path / "s", ct=1, mr=0, sc=0)[0].read_bytes()
    hostile = {
        "traversal": (_zip([("DICOMDIR", _dicomdir_to("IM1")), ("../../etc/evil", dicom)]), "unsafe name"),
        "absolute": (_zip([("/tmp/evil.dcm", dicom)]), "unsafe name"),
        "bomb": (_zip([("DICOMDIR", b"\0" * 10), ("IM1", b"\0" * (300 * 1024 * 1024))]), "zip bomb"),
        "outside": (_zip([("DICOMDIR", _dicomdir_to("../IM1")), ("IM1", dicom)]), "outside the archive"),
        "missing": (_zip([("DICOMDIR", _dicomdir_to("IM9")), ("IM1", dicom)]), "not in the archive"),
        "garbage": (b"PK\x03\x04not a zip at all", "not a readable ZIP"),
    }
    me, sender = identity(pki_dir, "gateway-a-smime"), identity(pki_dir, "gateway-b-smime")
    book = {B: Sender("b", (cert(pki_dir, "gateway-b-smime"),))}
    for name, (archive, reason) in hostile.items():
        h = mailformat.MailHeader(B, A, "DICOM-ZIP", f"<{name}@x>", name, 1, 1, "1.2", time.time())
        raw = mailformat.wrap_smime(
            h, mailformat.build_inner_zip(h, archive), sender, cert(pki_dir, "gateway-a-smime")
        )
        with pytest.raises(Refused) as refused:
            inspect_mail(raw, me, book, max_unpacked=200 * 1024 * 1024)
        assert reason in refused.value.reason, (name, refused.value.reason)
    # without a DICOMDIR every DICOM entry is read (PS3.11 G.2.1.2)
    assert dicomzip.read_zip(_zip([("A/B", dicom), ("README.TXT", b"hello")]), 10**8) == [dicom]


# ------------------------------------------------------------------------------------------- message/partial


def test_fragments_reassemble_in_any_order(pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    files = [p.read_bytes() for p in make_study(tmp_path / "s", ct=8, mr=0, sc=0, size=256)]
    raw = mailformat.build_mail(
        header(), files, identity(pki_dir, "gateway-a-smime"), cert(pki_dir, "gateway-b-smime")
    )
    pieces = partial.fragment(raw, 128 * 1024, "t1.1@dicommail.test", [("From", A), ("To", B)], "DICOM-eMail")
    assert len(pieces) > 5 and all(len(p) <= 128 * 1024 for p in pieces)
    ids = [partial.read_fragment(p) for p in pieces]
    assert {i.total for i in ids} == {len(pieces)} and [i.number for i in ids] == list(
        range(1, len(pieces) + 1)
    )
    assert message_from_bytes(pieces[1], policy=compat32)["Subject"] == f"DICOM-eMail (2/{len(pieces)})"
    order = list(range(len(pieces)))
    random.Random(3).shuffle(order)
    whole = partial.reassemble({ids[i].number: pieces[i] for i in order})
    got = inspect_mail(
        whole, identity(pki_dir, "gateway-b-smime"), {A: Sender("a", (cert(pki_dir, "gateway-a-smime"),))}
    )
    assert isinstance(got, Accepted) and [d for _, d in got.parts] == files
    with pytest.raises(mailformat.MailFormatError, match="missing"):
        partial.reassemble({ids[i].number: pieces[i] for i in order[1:]})


# ------------------------------------------------------------------------------------------- receipts


@pytest.mark.parametrize("outcome", mdn.OUTCOMES)
def test_receipts_round_trip_signed(pki_dir, keyrings, outcome):  # type: ignore[no-untyped-def]
    a, b = keyrings
    report = mdn.build_report(sender=B, original_message_id="<t1.1@x>", outcome=outcome, detail="why not")
    head = mime.header_lines(mdn.outer_headers(B, A, "Disposition notification", "<r1@x>", time.time()))
    me = identity(pki_dir, "gateway-a-smime")
    book = {B: Sender("gateway-b", (cert(pki_dir, "gateway-b-smime"),), b.own_fingerprint)}
    for raw in (
        head + mailformat.build_signed(report, identity(pki_dir, "gateway-b-smime")),  # S/MIME partner
        head
        + pgpmime.encrypted_entity(report, lambda d: b.sign_encrypt(d, a.own_fingerprint)),  # @GIT partner
    ):
        got = inspect_mail(raw, me, book, a)
        assert isinstance(got, ReceiptIn) and got.signed
        assert got.receipt == mdn.Receipt("<t1.1@x>", outcome, "why not")
    unsigned = inspect_mail(head + report, me, book, a)
    assert isinstance(unsigned, ReceiptIn) and not unsigned.signed
    forged = head + mailformat.build_signed(report, identity(pki_dir, "rogue-gateway-b-smime"))
    with pytest.raises(Refused):
        inspect_mail(forged, me, book, a)


# ------------------------------------------------------------------------------------------- compression


def test_jpeg2000_and_deflate_keep_every_pixel(tmp_path):  # type: ignore[no-untyped-def]
    sources = make_study(tmp_path / "s", ct=3, mr=2, sc=0, size=256)
    for src in sources:
        data = src.read_bytes()
        original = pydicom.dcmread(io.BytesIO(data))
        j2k = compress.transcode(data, "jpeg2000-lossless")
        assert j2k is not None and j2k.transfer_syntax == "1.2.840.10008.1.2.4.90"
        received = pydicom.dcmread(io.BytesIO(j2k.data))
        assert np.array_equal(received.pixel_array, original.pixel_array)
        assert received.SOPInstanceUID == original.SOPInstanceUID
        deflated = compress.transcode(data, "deflate")
        assert deflated is not None and len(deflated.data) < len(data)
        back = pydicom.dcmread(io.BytesIO(deflated.data))
        assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
        assert np.array_equal(back.pixel_array, original.pixel_array)
        # an already compressed instance passes unchanged
        assert compress.transcode(j2k.data, "jpeg2000-lossless") is None
        assert compress.transcode(j2k.data, "deflate") is None


# ------------------------------------------------------------------------------------------- address book


def _config(tmp_path: Path, pki_dir: Path, partner: str) -> Path:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f"""
[gateway]
name = "gw"
ae_title = "GW"
[storage]
d_root = "{tmp_path / "d"}"
e_root = "{tmp_path / "e"}"
[mail]
address = "gw@dicommail.test"
client_cert = "{pki_dir / "gateway-a-tls.pem"}"
client_key = "{pki_dir / "gateway-a-tls.key"}"
ca_bundle = "{pki_dir / "ca.pem"}"
smtp_nodes = ["127.0.0.11"]
pop3_nodes = ["127.0.0.11"]
[smime]
cert = "{pki_dir / "gateway-a-smime.pem"}"
key = "{pki_dir / "gateway-a-smime.key"}"
[pgp]
key = "{pki_dir / "gateway-a-pgp.sec.asc"}"
[[partners]]
name = "site-b"
ae_title = "TO_B"
institution = "Klinikum B"
location = "Bstadt"
addresses = ["b@dicommail.test", "b@mail2.dicommail.test"]
{partner}
"""
    )
    return cfg


def test_address_book_checks_keys_at_start(pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    from gateway.addressbook import load_address_book
    from gateway.config import load

    ok = load(_config(tmp_path, pki_dir, f'format = "pgp"\npgp_key = "{pki_dir / "gateway-b-pgp.pub.asc"}"'))
    book = load_address_book(ok)
    entry = book.expiry()[0]
    assert entry["format"] == "pgp" and entry["days_left"] is not None and 600 < entry["days_left"] < 800
    assert ok.partner_by_address("B@mail2.dicommail.test") is ok.partners[0]
    # mistakes refuse to start, naming the partner
    wrong = {
        'format = "pgp"': "needs its OpenPGP public key",
        f'smime_cert = "{pki_dir / "gateway-b-tls.pem"}"': "emailProtection",
        f'format = "pgp"\npgp_key = "{pki_dir / "gateway-b-pgp.pub.asc"}"\npgp_fingerprint = "{"AB" * 20}"': "key file holds",
        f'smime_cert = "{pki_dir / "gateway-b-pgp.pub.asc"}"': "not a PEM certificate",
        'smime_cert = "nowhere.pem"': "file not found",
        'format = "zip"': "smime or smime-zip or pgp",
    }
    for lines, problem in wrong.items():
        with pytest.raises(ConfigError) as err:
            load_address_book(load(_config(tmp_path, pki_dir, lines)))
        assert problem in str(err.value) and "partners[0]" in str(err.value), (lines, str(err.value))
    # an expired key suspends the partner (the gateway still starts; the reason is kept)
    old = pki.CA(pki_dir, "ca", "DICOM Mail dev CA").issue(
        "expired-b-smime",
        "b@dicommail.test",
        eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
        sans=[x509.RFC822Name("b@dicommail.test")],
        rsa_key=True,
        not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
    )
    book = load_address_book(load(_config(tmp_path, pki_dir, f'smime_cert = "{old.cert}"')))
    assert "expired" in (book.expiry()[0]["problem"] or "")


def test_content_headers_that_are_not_ascii_are_refused_not_crashed(pki_dir, keyrings):  # type: ignore[no-untyped-def]
    """Found by the corpus fuzzer: one flipped byte in a Content-Type header must give a reason, not a traceback."""
    a, _ = keyrings
    raw = (
        f"From: {A}\r\nTo: {B}\r\nSubject: DICOM-eMail\r\nMessage-ID: <x@y>\r\n".encode()
        + b"Content-Type: text/plain\r\nContent-Description: caf\xff\r\n\r\nAAAA\r\n"
    )
    with pytest.raises(Refused):
        inspect_mail(raw, identity(pki_dir, "gateway-b-smime"), book_of_b(pki_dir, a), None)


# ------------------------------------------------------------------------------------------- streamed S/MIME


def test_a_streamed_smime_mail_opens_in_openssl_and_in_the_gateway(pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """The package stage writes S/MIME mails in pieces (`write_smime`, definite-length DER computed before the
    content is read): OpenSSL decrypts and verifies it, the gateway accepts every instance byte for byte, and
    the MIC and instance digests it reports are those of what went in."""
    paths = make_study(tmp_path / "s", ct=3, mr=2, sc=1)
    h = header()
    out = bytearray()
    with contextlib.ExitStack() as stack:
        parts = [(stack.enter_context(p.open("rb")), p.stat().st_size) for p in paths]
        written = mailstream.write_smime(
            h, parts, identity(pki_dir, "gateway-a-smime"), cert(pki_dir, "gateway-b-smime"), out.extend
        )
    raw = bytes(out)
    files = [p.read_bytes() for p in paths]
    assert written.wire_ready and mime.wire_ready(raw)
    assert written.digests == [hashlib.sha256(f).hexdigest() for f in files]
    content = openssl_opens(raw, pki_dir, tmp_path)
    dicoms = [
        p.get_payload(decode=True) for p in content.walk() if p.get_content_type() == "application/dicom"
    ]
    assert dicoms == files
    _, signed = mailformat.unwrap_smime(
        raw, identity(pki_dir, "gateway-b-smime"), [cert(pki_dir, "gateway-a-smime")]
    )
    assert written.mic == mdn.content_mic(signed)
    got = inspect_mail(
        raw, identity(pki_dir, "gateway-b-smime"), {A: Sender("a", (cert(pki_dir, "gateway-a-smime"),))}
    )
    assert isinstance(got, Accepted) and [d for _, d in got.parts] == files


def test_a_part_that_changes_size_while_its_mail_is_written_fails_the_mail(pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    path = make_study(tmp_path / "s", ct=1)[0]
    size = path.stat().st_size
    with path.open("rb") as f, pytest.raises(mime.MailFormatError, match="not the"):
        mailstream.write_smime(
            header(), [(f, size + 10)], identity(pki_dir, "gateway-a-smime"), cert(pki_dir, "gateway-b-smime"),
            lambda _: None,
        )  # fmt: skip


def test_base64_written_in_pieces_is_the_base64_of_the_whole() -> None:
    rng = random.Random(7)
    data = rng.randbytes(3 * cmsstream.B64_PIECE + 1234)
    for _ in range(20):
        out = bytearray()
        lines = cmsstream.Base64Lines(out.extend)
        at = 0
        while at < len(data):
            step = rng.choice([1, 56, 57, 4096, cmsstream.B64_PIECE - 1, cmsstream.B64_PIECE + 3])
            lines.write(data[at : at + step])
            at += step
        lines.close()
        assert bytes(out) == bytes(mime.b64_lines(data))


def test_an_envelope_takes_exactly_the_content_it_was_sized_for(pki_dir) -> None:  # type: ignore[no-untyped-def]
    out = bytearray()
    env = cmsstream.Envelope(cert(pki_dir, "gateway-b-smime"), 100, out.extend)
    env.write(bytes(60))
    with pytest.raises(SmimeError, match="more content"):
        env.write(bytes(41))
    short = cmsstream.Envelope(cert(pki_dir, "gateway-b-smime"), 100, out.extend)
    short.write(bytes(99))
    with pytest.raises(SmimeError, match="1 bytes short"):
        short.close()
    whole = bytearray()
    env = cmsstream.Envelope(cert(pki_dir, "gateway-b-smime"), 100, whole.extend)
    env.write(bytes(range(100)))
    env.close()
    assert len(whole) == env.total
    assert smime.decrypt(bytes(whole), identity(pki_dir, "gateway-b-smime")) == bytes(range(100))


def test_the_signature_is_as_long_as_sized_in_every_century(pki_dir) -> None:  # type: ignore[no-untyped-def]
    """A mail's length is fixed before its content is hashed: the signature's DER length must come out as sized,
    also where the signing time changes its encoding (UTCTime until 2049, GeneralizedTime from 2050)."""
    signer = identity(pki_dir, "gateway-a-smime")
    for year in (2026, 2049, 2050, 2101):
        when = dt.datetime(year, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
        made = cmsstream.signed_data_detached(hashlib.sha256(b"x").digest(), signer, when)
        assert len(made) == cmsstream.signature_length(signer, when), year
