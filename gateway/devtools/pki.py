"""A test and development PKI: one CA, the mail servers' certificate, per-gateway TLS client and S/MIME
certificates, and a rogue CA that issues look-alike certificates for negative tests.

Never use these in production: the keys are unencrypted and the CA key lies beside them.

    python -m gateway.devtools.pki DIR gateway-a gateway-b
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DOMAIN = "dicommail.test"
NODE_IPS = tuple(f"127.0.0.{11 + i}" for i in range(6))

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    """A certificate and key written as PEM files."""

    cert: Path
    key: Path


def address_of(name: str) -> str:
    """The dev mailbox address of a gateway name."""
    return f"{name}@{DOMAIN}"


def _write_key(path: Path, key: PrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _name(cn: str, org: str = "DICOM Mail Gateway dev PKI") -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key, days: int, not_after: dt.datetime | None = None
) -> x509.CertificateBuilder:
    """A certificate valid from an hour ago for `days` days, or until `not_after` (which may be in the past)."""
    now = dt.datetime.now(dt.UTC)
    not_before = min(now - dt.timedelta(hours=1), (not_after or now) - dt.timedelta(days=1))
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after or now + dt.timedelta(days=days))
    )


class CA:
    """A certificate authority that writes what it issues into one folder."""

    def __init__(self, folder: Path, stem: str, cn: str) -> None:
        self.folder = folder
        self.stem = stem
        cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
        if cert_path.exists() and key_path.exists():
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)
            self.key = loaded
        else:
            self.key = ec.generate_private_key(ec.SECP256R1())
            name = _name(cn)
            self.cert = (
                _builder(name, name, self.key.public_key(), 3650)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
                )
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
                )
                .sign(self.key, hashes.SHA256())
            )
            cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
            _write_key(key_path, self.key)
        self.cert_path = cert_path

    def issue(
        self,
        stem: str,
        cn: str,
        *,
        eku: list[x509.ObjectIdentifier],
        sans: list[x509.GeneralName],
        rsa_key: bool = False,
        days: int = 825,
        not_after: dt.datetime | None = None,
    ) -> Issued:
        """Issue (or reuse, if already on disk) a leaf certificate."""
        cert_path, key_path = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        if cert_path.exists() and key_path.exists():
            return Issued(cert_path, key_path)
        key: PrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if rsa_key
            else ec.generate_private_key(ec.SECP256R1())
        )
        builder = _builder(_name(cn), self.cert.subject, key.public_key(), days, not_after)
        encipher = rsa_key
        cert = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, encipher, False, not rsa_key, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return Issued(cert_path, key_path)


def mail_server_cert(ca: CA) -> Issued:
    """The certificate every node of the dev mail cluster presents."""
    names = [f"mail{i}.{DOMAIN}" for i in range(1, 7)] + [f"mail.{DOMAIN}", "localhost"]
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in (*NODE_IPS, "127.0.0.1")]
    return ca.issue("mail-server", f"mail.{DOMAIN}", eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)


def tls_client_cert(ca: CA, gateway: str, stem: str | None = None) -> Issued:
    """A TLS client certificate whose CN is the gateway's mailbox address (Dovecot logs in with it)."""
    addr = address_of(gateway)
    return ca.issue(
        stem or f"{gateway}-tls", addr, eku=[ExtendedKeyUsageOID.CLIENT_AUTH], sans=[x509.RFC822Name(addr)]
    )


def smime_cert(ca: CA, gateway: str, stem: str | None = None) -> Issued:
    """An RSA S/MIME certificate (signing and key encipherment) for the gateway's address."""
    addr = address_of(gateway)
    return ca.issue(
        stem or f"{gateway}-smime",
        addr,
        eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
        sans=[x509.RFC822Name(addr)],
        rsa_key=True,
    )


def pgp_key(folder: Path, gateway: str, stem: str | None = None) -> tuple[Path, Path]:
    """An OpenPGP key (ed25519 signing, cv25519 encryption subkey, no passphrase) for the gateway's address.

    Writes `<stem>-pgp.sec.asc` and `<stem>-pgp.pub.asc`; made once (idempotent). GnuPG runs in a throw-away home.
    """
    stem = stem or gateway
    sec, pub = folder / f"{stem}-pgp.sec.asc", folder / f"{stem}-pgp.pub.asc"
    if sec.exists() and pub.exists():
        return sec, pub
    with tempfile.TemporaryDirectory(prefix="dmg-pki-") as home:
        gpg = ["gpg", "--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
        uid = f"{gateway} (DICOM Mail Gateway dev PKI) <{address_of(gateway)}>"
        subprocess.run(
            [*gpg, "--quick-gen-key", uid, "future-default", "default", "2y"], check=True, capture_output=True
        )
        secret = subprocess.run(
            [*gpg, "--armor", "--export-secret-keys"], check=True, capture_output=True
        ).stdout
        public = subprocess.run([*gpg, "--armor", "--export"], check=True, capture_output=True).stdout
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], check=False, capture_output=True)
    sec.write_bytes(secret)
    sec.chmod(0o600)
    pub.write_bytes(public)
    return sec, pub


def make_dev_pki(folder: Path, gateways: list[str]) -> CA:
    """Create (idempotently) the CA, server cert, and per-gateway TLS and S/MIME certs, plus rogue look-alikes."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = CA(folder, "ca", "DICOM Mail dev CA")
    mail_server_cert(ca)
    rogue = CA(folder, "rogue-ca", "Rogue CA")
    for gw in gateways:
        tls_client_cert(ca, gw)
        smime_cert(ca, gw)
        tls_client_cert(rogue, gw, stem=f"rogue-{gw}-tls")
        smime_cert(rogue, gw, stem=f"rogue-{gw}-smime")
        pgp_key(folder, gw)
    return ca


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__)
        raise SystemExit(2)
    make_dev_pki(Path(sys.argv[1]), sys.argv[2:])
