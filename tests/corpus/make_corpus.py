"""Writes the hostile-mail corpus: tests/corpus/mails/*.eml and expected.json (file → reason, or ACCEPT).

The corpus has its own fixed test PKI (tests/corpus/pki, test keys only), so the checked-in mails stay valid on
every machine. Run again only to add cases: `python tests/corpus/make_corpus.py` (needs `openssl`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from cryptography import x509  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from gateway.core import mailformat as mf  # noqa: E402, mime
from gateway.core import smime  # noqa: E402
from gateway.devtools.pki import CA  # noqa: E402
from gateway.devtools.studies import make_study  # noqa: E402

SENDER = "sender@corpus.test"
RECEIVER = "receiver@corpus.test"
PKI = HERE / "pki"
MAILS = HERE / "mails"
CRLF = b"\r\n"


def smime_identity(ca: CA, stem: str, addr: str, not_after: dt.datetime | None = None) -> smime.Identity:
    issued = ca.issue(
        stem,
        addr,
        eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
        sans=[x509.RFC822Name(addr)],
        rsa_key=True,
        not_after=not_after,
    )
    return smime.Identity.load(issued.cert.read_bytes(), issued.key.read_bytes())


def main() -> None:
    PKI.mkdir(parents=True, exist_ok=True)
    MAILS.mkdir(parents=True, exist_ok=True)
    for old in MAILS.glob("*.eml"):
        old.unlink()
    ca = CA(PKI, "corpus-ca", "Corpus CA")
    rogue_ca = CA(PKI, "corpus-rogue-ca", "Corpus Rogue CA")
    a = smime_identity(ca, "sender", SENDER)
    b = smime_identity(ca, "receiver", RECEIVER)
    stranger = smime_identity(ca, "stranger", "stranger@corpus.test")
    rogue = smime_identity(rogue_ca, "rogue-sender", SENDER)
    expired = smime_identity(
        ca, "expired-sender", SENDER, not_after=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = make_study(Path(tmp), ct=3, mr=0, sc=0, size=8, seed=99)
        dicom = [f.read_bytes() for f in files]
    now = time.time()
    cases: dict[str, str] = {}

    def header(set_id: str = "corpus1", part: int = 1, total: int = 1, sender: str = SENDER) -> mf.MailHeader:
        return mf.MailHeader(
            sender,
            RECEIVER,
            "DICOM-eMail",
            f"<{set_id}.{part}@corpus.test>",
            set_id,
            part,
            total,
            "1.2.3.4.5",
            now,
        )

    def outer(body_headers: list[tuple[str, str]], body: bytes, sender: str | None = SENDER) -> bytes:
        pairs = ([("From", sender)] if sender else []) + [
            ("To", RECEIVER),
            ("Subject", "DICOM-eMail"),
            ("Message-ID", "<corpus@corpus.test>"),
        ]
        return b"".join(f"{k}: {v}".encode() + CRLF for k, v in pairs + body_headers) + CRLF + body

    def envelope(entity: bytes, sender: str | None = SENDER, recipient: x509.Certificate = b.cert) -> bytes:
        der = smime.encrypt(entity, [recipient])
        return outer(
            [
                ("MIME-Version", "1.0"),
                ("Content-Type", 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'),
                ("Content-Transfer-Encoding", "base64"),
            ],
            mf.b64_lines(der),
            sender,
        )

    def custom_inner(parts: list[tuple[str, bytes]], extra: bytes = b"") -> bytes:
        out = [b'Content-Type: multipart/mixed; boundary="BB"' + CRLF + extra + CRLF]
        for ctype, payload in parts:
            out.append(
                b"--BB" + CRLF + ctype.encode() + CRLF + b"Content-Transfer-Encoding: base64" + CRLF + CRLF
            )
            out.append(mf.b64_lines(payload))
        out.append(b"--BB--" + CRLF)
        return b"".join(out)

    def good_signed(inner: bytes, who: smime.Identity = a) -> bytes:
        return mf.build_signed(inner, who)

    def add(name: str, data: bytes, expect: str) -> None:
        number = len(cases) + 1
        fname = f"{number:02d}-{name}.eml"
        (MAILS / fname).write_bytes(data)
        cases[fname] = expect

    inner_ok = mf.build_inner(header(), dicom[:2])
    dcm = 'application/dicom; name="IM1.dcm"'

    add("good-two-instances", mf.build_mail(header(), dicom[:2], a, b.cert), "ACCEPT")
    add("good-second-of-set", mf.build_mail(header("corpus2", 2, 2), dicom[2:], a, b.cert), "ACCEPT")
    add("empty", b"", "no end of headers")
    add("headers-without-body", b"From: sender@corpus.test\r\nSubject: x\r\n", "no end of headers")
    add(
        "binary-garbage",
        b"".join(hashlib.sha256(bytes([i])).digest() for i in range(256)),
        "no end of headers",
    )
    add("plain-text", outer([("Content-Type", "text/plain")], b"hello" + CRLF), "not encrypted")
    add("plain-multipart-dicom", outer([("MIME-Version", "1.0")], inner_ok), "not encrypted")
    opaque = smime.sign_detached(inner_ok, a)
    add(
        "signed-only-opaque",
        outer([("Content-Type", "application/pkcs7-mime; smime-type=signed-data")], mf.b64_lines(opaque)),
        "not encrypted",
    )
    add("signed-only-multipart", outer([("MIME-Version", "1.0")], good_signed(inner_ok)), "not encrypted")
    add("encrypted-for-someone-else", envelope(good_signed(inner_ok), recipient=a.cert), "cannot decrypt")
    bad_b64 = envelope(good_signed(inner_ok)).replace(b"MII", b"M*I", 1)
    add("invalid-base64", bad_b64, "invalid base64")
    der = smime.encrypt(good_signed(inner_ok), [b.cert])
    enc_headers = [
        ("Content-Type", "application/pkcs7-mime; smime-type=enveloped-data"),
        ("Content-Transfer-Encoding", "base64"),
    ]
    add("truncated-envelope", outer(enc_headers, mf.b64_lines(der[: len(der) // 2])), "cannot decrypt")
    add(
        "random-envelope",
        outer(enc_headers, mf.b64_lines(hashlib.sha512(b"x").digest() * 40)),
        "cannot decrypt",
    )
    add("unsigned-inside", envelope(inner_ok), "not signed")
    add("rogue-ca-signer", envelope(good_signed(inner_ok, rogue)), "not in the address book")
    add("stranger-signer", envelope(good_signed(inner_ok, stranger)), "not in the address book")
    add("receiver-signed-itself", envelope(good_signed(inner_ok, b)), "not in the address book")
    add(
        "unknown-sender-address",
        envelope(good_signed(inner_ok), sender="evil@corpus.test"),
        "sender is not in the address book",
    )
    add("missing-from", envelope(good_signed(inner_ok), sender=None), "sender is not in the address book")
    tampered = good_signed(inner_ok).replace(b"IM000001.dcm", b"IM000009.dcm", 1)
    add("tampered-after-signing", envelope(tampered), "altered")
    sig = smime.sign_detached(inner_ok, a)
    one_part = (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="S"'
        + CRLF
        + CRLF
        + b"--S"
        + CRLF
        + inner_ok
        + CRLF
        + b"--S--"
        + CRLF
    )
    add("signature-part-missing", envelope(one_part), "without two parts")

    def signed_with(sig_part: bytes, boundary_param: bool = True) -> bytes:
        ctype = b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"'
        ctype += b'; boundary="S"' if boundary_param else b""
        return (
            ctype
            + CRLF
            + CRLF
            + b"--S"
            + CRLF
            + inner_ok
            + CRLF
            + b"--S"
            + CRLF
            + sig_part
            + CRLF
            + b"--S--"
            + CRLF
        )

    add(
        "signature-wrong-type",
        envelope(signed_with(b"Content-Type: text/plain" + CRLF + CRLF + b"trust me")),
        "signature part has type",
    )
    add(
        "signature-garbage",
        envelope(
            signed_with(
                b"Content-Type: application/pkcs7-signature"
                + CRLF
                + b"Content-Transfer-Encoding: base64"
                + CRLF
                + CRLF
                + mf.b64_lines(b"\x30\x82garbage" * 30)
            )
        ),
        "malformed signature",
    )
    add(
        "signed-without-boundary",
        envelope(
            signed_with(
                b"Content-Type: application/pkcs7-signature" + CRLF + CRLF + mf.b64_lines(sig),
                boundary_param=False,
            )
        ),
        "without boundary",
    )

    def with_parts(parts: list[tuple[str, bytes]], extra: bytes = b"") -> bytes:
        return envelope(good_signed(custom_inner(parts, extra)))

    add("dicom-truncated", with_parts([(f"Content-Type: {dcm}", dicom[0][:100])]), "not DICOM")
    add("dicom-without-preamble", with_parts([(f"Content-Type: {dcm}", dicom[0][132:])]), "not DICOM")
    bad_uid = dicom[0].replace(dicom[0][dicom[0].index(b"1.2.826") :][:20], b"abc.def.ghi.jkl.mnop", 2)
    add("dicom-bad-uid", with_parts([(f"Content-Type: {dcm}", bad_uid)]), "not DICOM")
    add(
        "part-pdf",
        with_parts([(f"Content-Type: {dcm}", dicom[0]), ("Content-Type: application/pdf", b"%PDF-1.4 fake")]),
        "non-DICOM part (application/pdf)",
    )
    add(
        "part-executable",
        with_parts([("Content-Type: application/octet-stream", b"MZ\x90\x00" * 64)]),
        "non-DICOM part (application/octet-stream)",
    )
    add(
        "part-html",
        with_parts([("Content-Type: text/html", b"<script>alert(1)</script>")]),
        "non-DICOM part (text/html)",
    )
    add("empty-dicom-part", with_parts([(f"Content-Type: {dcm}", b"")]), "empty or undecodable")
    add("no-dicom-at-all", with_parts([("Content-Type: text/plain", b"just a note")]), "no DICOM part")
    add("part-beyond-total", mf.build_mail(header("corpus3", 5, 2), dicom[:1], a, b.cert), "impossible")
    add("part-zero", mf.build_mail(header("corpus4", 0, 1), dicom[:1], a, b.cert), "impossible")
    add(
        "same-instance-twice",
        mf.build_mail(header("corpus5"), [dicom[0], dicom[0]], a, b.cert),
        "appears twice",
    )
    meta_sop = dicom[0].index(b"1.2.826")  # the first UID in the file is in the meta group
    mismatch = dicom[0][:meta_sop] + b"9" + dicom[0][meta_sop + 1 :]
    add("meta-uid-mismatch", with_parts([(f"Content-Type: {dcm}", mismatch)]), "not DICOM")
    many = [("Content-Type: text/plain", b"x")] * (mf.MAX_PARTS + 1)
    add("too-many-parts", with_parts(many), "more than")
    nested = inner_ok
    for depth in range(12):
        nested = (
            f'Content-Type: multipart/mixed; boundary="N{depth}"'.encode()
            + CRLF
            + CRLF
            + f"--N{depth}".encode()
            + CRLF
            + nested
            + CRLF
            + f"--N{depth}--".encode()
            + CRLF
        )
    add("nested-too-deep", envelope(good_signed(nested)), "nesting deeper")
    add("huge-header", outer([("X-Filler", "A" * (mf.MAX_HEADER_BYTES + 10))], b"x"), "no end of headers")
    add("expired-signer", envelope(good_signed(inner_ok, expired)), "expired")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "inner.eml").write_bytes(inner_ok)
        subprocess.run(
            [
                "openssl",
                "cms",
                "-sign",
                "-md",
                "sha1",
                "-binary",
                "-in",
                str(t / "inner.eml"),
                "-signer",
                str(PKI / "sender.pem"),
                "-inkey",
                str(PKI / "sender.key"),
                "-out",
                str(t / "signed.eml"),
            ],
            check=True,
            capture_output=True,
        )
        add("sha1-signature", envelope((t / "signed.eml").read_bytes()), "digest algorithm sha1 not accepted")
    b64_broken = envelope(
        good_signed(custom_inner([(f"Content-Type: {dcm}", dicom[0])]).replace(b"AAAA", b"!!!!", 3))
    )
    add("dicom-base64-corrupted", b64_broken, "not DICOM")
    other_uid = dicom[1].replace(dicom[1][dicom[1].index(b"1.2.826") :][:10], generate_uid()[:10].encode(), 0)
    add(
        "text-plain-attachment",
        with_parts(
            [
                (f"Content-Type: {dcm}", other_uid),
                ('Content-Type: text/plain\r\nContent-Disposition: attachment; filename="a.txt"', b"x"),
            ]
        ),
        "non-DICOM part (text/plain)",
    )
    # accepted by the gate, but the instance's UID is already stored with other content: kept aside at ingest
    collision = dicom[0][:-4] + b"\x07\x07\x07\x07"
    add("uid-collision", mf.build_mail(header("corpus6"), [collision], a, b.cert), "ACCEPT")
    (HERE / "expected.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"{len(cases)} corpus mails written to {MAILS}")
    _ = base64  # (kept for ad-hoc cases)


if __name__ == "__main__":
    main()
