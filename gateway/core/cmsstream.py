"""CMS built in pieces, for mails that are written while they are read (PS3.15 B.8, RFC 5652): a detached
SignedData over a digest computed elsewhere, an EnvelopedData (AES-256-CBC, RSA key transport) whose content is
encrypted piece by piece into a sink, and base64 in 76-character lines written piece by piece.

Pure: bytes in, bytes out to a caller's `write`; no file is opened here. The DER is definite-length throughout (the
content's length is known before it starts), byte for byte what a partner's `openssl cms -decrypt` or
`smime.decrypt` reads, so the whole mail never has to be in memory: OpenSSL's own `-stream` output is BER
(indefinite lengths), which some receivers refuse.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable

from asn1crypto import algos, cms
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.core.mime import b64_lines
from gateway.core.smime import Identity, SmimeError

Write = Callable[[bytes], object]

_LINE = 57  # raw bytes in one 76-character line of base64
# Raw bytes per step: whole lines, 57 KiB, so that a piece stays in the cache through base64, hashing, AES and
# base64 again (a megabyte per step was 3 times slower here: every pass went to memory).
B64_PIECE = _LINE * 1024


def _cert(cert: x509.Certificate) -> ax509.Certificate:
    return ax509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _issuer_serial(cert: x509.Certificate) -> cms.IssuerAndSerialNumber:
    parsed = _cert(cert)
    return cms.IssuerAndSerialNumber({"issuer": parsed.issuer, "serial_number": parsed.serial_number})


def signature_length(signer: Identity, now: dt.datetime) -> int:
    """The length of the DER `signed_data_detached` makes for this signer at `now` (it does not depend on the
    content: the digest and an RSA signature have fixed lengths, and the signing time's encoding depends only on
    its century), so that a mail's length is known before its content is hashed."""
    return len(_signed_data(signer, bytes(32), now, None))


def signed_data_detached(digest: bytes, signer: Identity, now: dt.datetime | None = None) -> bytes:
    """A detached CMS SignedData (DER) for content whose SHA-256 is `digest`: signed attributes (content type,
    signing time, message digest) signed with RSA PKCS #1 v1.5, the signer's certificate included."""
    return _signed_data(signer, digest, now or dt.datetime.now(dt.UTC), signer.key)


def _signed_data(signer: Identity, digest: bytes, now: dt.datetime, key: rsa.RSAPrivateKey | None) -> bytes:
    attrs = [
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "signing_time", "values": [_signing_time(now)]}),
        cms.CMSAttribute({"type": "message_digest", "values": [digest]}),
    ]
    attrs.sort(key=lambda a: a.dump())  # DER: a SET OF in the order of its encodings
    signed_attrs = cms.CMSAttributes(attrs)
    to_sign = signed_attrs.dump()  # the signature covers the attributes as a SET OF (RFC 5652 5.4)
    if key is None:
        signature = bytes(signer.key.key_size // 8 + (1 if signer.key.key_size % 8 else 0))
    else:
        signature = key.sign(to_sign, asym_padding.PKCS1v15(), hashes.SHA256())
    info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier({"issuer_and_serial_number": _issuer_serial(signer.cert)}),
            "digest_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
            "signed_attrs": cms.CMSAttributes.load(to_sign),
            "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}),
            "signature": signature,
        }
    )
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256"})],
            "encap_content_info": cms.ContentInfo({"content_type": "data"}),
            "certificates": [cms.CertificateChoices({"certificate": _cert(signer.cert)})],
            "signer_infos": [info],
        }
    )
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def _signing_time(now: dt.datetime) -> cms.Time:
    """RFC 5652 11.3: UTCTime for 1950 to 2049, GeneralizedTime otherwise."""
    kind = "utc_time" if 1950 <= now.year <= 2049 else "generalized_time"
    return cms.Time({kind: now.replace(microsecond=0)})


def _tlv_head(tag: int, length: int) -> bytes:
    """A DER tag and definite length."""
    if length < 0x80:
        return bytes([tag, length])
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size


def padded_length(length: int) -> int:
    """AES-CBC with PKCS #7 padding: the ciphertext's length for `length` bytes of content."""
    return (length // 16 + 1) * 16


class Envelope:
    """An EnvelopedData for one recipient whose `length` bytes of content arrive through `write` in pieces, each
    encrypted at once and handed on to `sink`; `close` adds the padding and checks that exactly `length` came."""

    def __init__(self, recipient: x509.Certificate, length: int, sink: Write) -> None:
        key = recipient.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SmimeError("the partner's S/MIME certificate must hold an RSA key")
        cek, iv = os.urandom(32), os.urandom(16)
        recipient_info = cms.RecipientInfo(
            {
                "ktri": cms.KeyTransRecipientInfo(
                    {
                        "version": "v0",
                        "rid": cms.RecipientIdentifier(
                            {"issuer_and_serial_number": _issuer_serial(recipient)}
                        ),
                        "key_encryption_algorithm": cms.KeyEncryptionAlgorithm(
                            {"algorithm": "rsaes_pkcs1v15"}
                        ),
                        "encrypted_key": key.encrypt(cek, asym_padding.PKCS1v15()),
                    }
                )
            }
        )
        head_fields = (
            cms.CMSVersion("v0").dump() + cms.RecipientInfos([recipient_info]).dump()
        )  # version, recipientInfos
        content_head = (
            cms.ContentType("data").dump()
            + algos.EncryptionAlgorithm({"algorithm": "aes256_cbc", "parameters": iv}).dump()
        )
        cipher_len = padded_length(length)
        encrypted = _tlv_head(0x80, cipher_len)  # encryptedContent [0] IMPLICIT OCTET STRING
        eci_len = len(content_head) + len(encrypted) + cipher_len
        eci = _tlv_head(0x30, eci_len) + content_head + encrypted
        env_len = len(head_fields) + len(eci) + cipher_len
        env = _tlv_head(0x30, env_len) + head_fields + eci
        explicit = _tlv_head(0xA0, len(env) + cipher_len) + env  # content [0] EXPLICIT
        oid = cms.ContentType("enveloped_data").dump()
        self.head = _tlv_head(0x30, len(oid) + len(explicit) + cipher_len) + oid + explicit
        self.total = len(self.head) + cipher_len
        self._sink = sink
        self._left = self._length = length
        self._encryptor = Cipher(algorithms.AES256(cek), modes.CBC(iv)).encryptor()
        sink(self.head)

    def write(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:
            raise SmimeError("more content than the envelope was sized for")
        self._sink(self._encryptor.update(data))  # CBC: a partial block waits inside the encryptor

    def close(self) -> None:
        if self._left:
            raise SmimeError(f"the envelope's content is {self._left} bytes short")
        pad = 16 - self._length % 16  # PKCS #7 padding (RFC 5652 6.3)
        self._sink(self._encryptor.update(bytes([pad]) * pad) + self._encryptor.finalize())


class Base64Lines:
    """Base64 in 76-character CRLF lines of everything written, in pieces; byte for byte `mime.b64_lines` of
    the whole: each piece is cut at whole lines (57 bytes), and at most one line's bytes wait for the next."""

    def __init__(self, sink: Write) -> None:
        self._sink = sink
        self._held = bytearray()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        if self._held:
            need = _LINE - len(self._held)
            self._held += view[:need]
            view = view[need:]
            if len(self._held) < _LINE:
                return
            self._sink(b64_lines(self._held))
            self._held = bytearray()
        whole = len(view) - len(view) % _LINE
        for start in range(0, whole, B64_PIECE):
            self._sink(b64_lines(view[start : min(start + B64_PIECE, whole)]))
        self._held += view[whole:]

    def close(self) -> None:
        if self._held:
            self._sink(b64_lines(self._held))
        self._held = bytearray()
