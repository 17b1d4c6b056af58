"""S/MIME (CMS) for DICOM e-mail, PS3.15 B.8: sign, encrypt (AES-256), decrypt, verify.

Pure: bytes and certificate objects in, bytes out. Signing and encryption use `cryptography`'s PKCS7 builders
(OpenSSL underneath). `cryptography` cannot verify CMS signatures, so verification parses SignedData with
`asn1crypto` and checks the signature with `cryptography`: the signer must be one of the *pinned* partner
certificates (the address book), looked up by issuer+serial or subject key identifier; certificates embedded in
the message are never trusted on their own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass

from asn1crypto import cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha224": hashes.SHA224,
}


class SmimeError(ValueError):
    """A CMS structure could not be decrypted or verified; the message is safe to show an operator."""


@dataclass(frozen=True)
class Identity:
    """A certificate with its private key (the gateway's own signing/decryption identity)."""

    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> Identity:
        """Load from PEM; the key must be RSA (S/MIME key transport)."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SmimeError("the S/MIME key must be an RSA key")
        if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
            raise SmimeError("the S/MIME certificate does not belong to the key")
        return cls(cert, key)


def sign_detached(content: bytes, signer: Identity) -> bytes:
    """A detached CMS SignedData (DER) over `content` exactly as given (SHA-256, signer cert included)."""
    return (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(content)
        .add_signer(signer.cert, signer.key, hashes.SHA256())
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary])
    )


def encrypt(content: bytes, recipients: list[x509.Certificate]) -> bytes:
    """A CMS EnvelopedData (DER) of `content` for the recipients, AES-256-CBC."""
    builder = (
        pkcs7.PKCS7EnvelopeBuilder().set_data(content).set_content_encryption_algorithm(algorithms.AES256)
    )
    for cert in recipients:
        builder = builder.add_recipient(cert)
    return builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])


def decrypt(der: bytes, me: Identity) -> bytes:
    """Decrypt a CMS EnvelopedData addressed to `me`."""
    try:
        return pkcs7.pkcs7_decrypt_der(der, me.cert, me.key, [])
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SmimeError(f"cannot decrypt: {exc}") from None


def _find_signer(sid: cms.SignerIdentifier, trusted: list[x509.Certificate]) -> x509.Certificate | None:
    if sid.name == "issuer_and_serial_number":
        issuer_der = sid.chosen["issuer"].dump()
        serial = sid.chosen["serial_number"].native
        for cert in trusted:
            if cert.serial_number == serial and cert.issuer.public_bytes() == issuer_der:
                return cert
        # Distinguished names can be encoded differently (string types); compare parsed forms too.
        issuer_native = sid.chosen["issuer"].native
        for cert in trusted:
            if cert.serial_number == serial:
                from asn1crypto import x509 as ax509

                if ax509.Name.load(cert.issuer.public_bytes()).native == issuer_native:
                    return cert
        return None
    ski = sid.chosen.native
    for cert in trusted:
        try:
            if cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == ski:
                return cert
        except x509.ExtensionNotFound:
            continue
    return None


def _check_signature(
    cert: x509.Certificate, algo: cms.SignedDigestAlgorithm, digest_name: str, signature: bytes, data: bytes
) -> None:
    key = cert.public_key()
    hash_cls = _HASHES[digest_name]
    sig_algo = algo.signature_algo
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if sig_algo == "rsassa_pss":
                params = algo["parameters"]
                mgf_hash = _HASHES.get(
                    params["mask_gen_algorithm"]["parameters"]["algorithm"].native, hash_cls
                )
                key.verify(
                    signature,
                    data,
                    padding.PSS(padding.MGF1(mgf_hash()), params["salt_length"].native),
                    hash_cls(),
                )
            else:
                key.verify(signature, data, padding.PKCS1v15(), hash_cls())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hash_cls()))
        else:
            raise SmimeError(f"unsupported signer key type {type(key).__name__}")
    except InvalidSignature:
        raise SmimeError("signature does not verify (content altered or wrong signer)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SmimeError(f"signature cannot be checked: {exc}") from None


@dataclass(frozen=True)
class Verified:
    """The outcome of a successful verification."""

    signer: x509.Certificate
    content: bytes


def verify(
    signed_der: bytes,
    trusted: list[x509.Certificate],
    content: bytes | None = None,
    now: dt.datetime | None = None,
) -> Verified:
    """Verify CMS SignedData; `content` is given for detached signatures, else it is taken from inside.

    Raises `SmimeError` unless at least one signer is a pinned certificate whose signature verifies and which is
    valid at `now`.


    Size: every check of a CMS signature in the order the trust decision needs them; split, the decision would be scattered.
    """
    try:
        info = cms.ContentInfo.load(signed_der)
        if info["content_type"].native != "signed_data":
            raise SmimeError(f"not a signature but {info['content_type'].native}")
        sd = info["content"]
        embedded = sd["encap_content_info"]["content"]
        if content is None:
            if embedded.native is None:
                raise SmimeError("detached signature without content")
            content = embedded.native
            if not isinstance(content, bytes):
                raise SmimeError("signed content is not plain data")
        signer_infos = list(sd["signer_infos"])
    except SmimeError:
        raise
    except Exception as exc:
        raise SmimeError(f"malformed signature structure: {type(exc).__name__}") from None
    if not signer_infos:
        raise SmimeError("signature has no signer")
    assert content is not None
    now = now or dt.datetime.now(dt.UTC)
    problems: list[str] = []
    for si in signer_infos:
        cert = _find_signer(si["sid"], trusted)
        if cert is None:
            problems.append("signer certificate is not in the address book")
            continue
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            problems.append("signer certificate is expired or not yet valid")
            continue
        digest_name = si["digest_algorithm"]["algorithm"].native
        if digest_name not in _HASHES:
            problems.append(f"digest algorithm {digest_name} not accepted")
            continue
        signed_attrs = si["signed_attrs"]
        if signed_attrs.native:
            attrs = {a["type"].native: a["values"] for a in signed_attrs}
            if "message_digest" not in attrs:
                problems.append("signed attributes lack the message digest")
                continue
            digest = hashlib.new(digest_name, content).digest()
            if not hmac.compare_digest(attrs["message_digest"][0].native, digest):
                problems.append("content digest does not match (content altered)")
                continue
            # The signature covers the DER of the attributes as a SET OF, not as the [0] IMPLICIT field.
            to_check = signed_attrs.untag().dump(force=True)
        else:
            to_check = content
        try:
            _check_signature(cert, si["signature_algorithm"], digest_name, si["signature"].native, to_check)
        except SmimeError as exc:
            problems.append(str(exc))
            continue
        return Verified(cert, content)
    raise SmimeError("; ".join(dict.fromkeys(problems)))


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, hex, for logs and status output."""
    return cert.fingerprint(hashes.SHA256()).hex()
