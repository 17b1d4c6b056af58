"""The partner address book at start-up: every partner's key material loaded and checked.

`load_address_book(settings)` reads each partner's S/MIME certificate and/or OpenPGP public key and refuses to
start (`ConfigError` naming the partner and the key) when one is missing, unreadable, of the wrong kind, or not
usable for what the partner's format needs (S/MIME: digitalSignature + keyEncipherment and, when present, the
emailProtection extended key usage; OpenPGP: an encryption and a signing capability; a pinned fingerprint that
does not match). Those are configuration mistakes to fix before anything runs.

An expired, not yet valid or revoked key is different: it happens to a running network on a date. The gateway still
starts (the other partners keep working), logs an error naming the partner, and that partner is suspended: its
transfers fail with the reason, its mails are held with the reason, until its key is renewed. Days until expiry
are kept for `status` and check_mk.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.adapters.openpgp import OpenPgp, PgpError, scan_key_file
from gateway.config import Partner, Settings
from gateway.core.inbound import Sender
from gateway.core.smime import Identity
from gateway.errors import ConfigError
from gateway.volume import node_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartnerKeys:
    """One partner with its loaded keys."""

    partner: Partner
    smime: x509.Certificate | None
    pgp_fingerprint: str
    expires: float | None  # the earliest expiry of its keys (epoch seconds), None = never
    problem: str | None = None  # why the partner is suspended (expired, not yet valid, revoked)

    def days_left(self, now: float | None = None) -> float | None:
        if self.expires is None:
            return None
        return (self.expires - (time.time() if now is None else now)) / 86400


def _fail(settings: Settings, index: int, key: str, problem: str) -> ConfigError:
    return ConfigError(str(settings.source), f"partners[{index}].{key}", problem)


def check_certificate(cert: x509.Certificate, now: dt.datetime) -> str | None:
    """Why this certificate cannot serve as a partner's S/MIME certificate, or None."""
    if cert.not_valid_after_utc <= now:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            return "key usage does not allow signatures (digitalSignature)"
        if not (usage.key_encipherment or usage.key_agreement):
            return "key usage does not allow encryption (keyEncipherment)"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if (
            ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku
            and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
        ):
            return "extended key usage lacks emailProtection (not an S/MIME certificate)"
    except x509.ExtensionNotFound:
        pass
    return None


def load_partner(settings: Settings, index: int, partner: Partner, now: float) -> PartnerKeys:
    """Load and check one partner's keys; `ConfigError` naming the partner when unusable."""
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    expiries: list[float] = []
    problems: list[str] = []
    cert = None
    if partner.smime_cert is not None:
        try:
            cert = x509.load_pem_x509_certificate(partner.smime_cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise _fail(
                settings, index, "smime_cert", f"partner {partner.name!r}: not a PEM certificate ({exc})"
            ) from None
        if problem := check_certificate(cert, moment):
            if not problem.startswith(("expired", "not valid before")):
                raise _fail(settings, index, "smime_cert", f"partner {partner.name!r}: certificate {problem}")
            problems.append(f"S/MIME certificate {problem}")
        expiries.append(cert.not_valid_after_utc.timestamp())
    fingerprint = ""
    if partner.pgp_key is not None:
        keys = scan_key_file(partner.pgp_key)
        if len(keys) != 1:
            raise _fail(
                settings,
                index,
                "pgp_key",
                f"partner {partner.name!r}: expected one OpenPGP key, found {len(keys)}",
            )
        key = keys[0]
        if partner.pgp_fingerprint and key.fingerprint != partner.pgp_fingerprint:
            raise _fail(
                settings,
                index,
                "pgp_fingerprint",
                f"partner {partner.name!r}: the key file holds {key.fingerprint}",
            )
        if key.validity == "r":
            problems.append("OpenPGP key is revoked")
        elif key.validity == "e" or (key.expires is not None and key.expires <= now):
            problems.append("OpenPGP key has expired")
        elif "E" not in key.capabilities or "S" not in key.capabilities:
            raise _fail(
                settings,
                index,
                "pgp_key",
                f"partner {partner.name!r}: key cannot both sign and encrypt (capabilities {key.capabilities!r})",
            )
        fingerprint = key.fingerprint
        if key.expires is not None:
            expiries.append(key.expires)
    return PartnerKeys(
        partner, cert, fingerprint, min(expiries) if expiries else None, "; ".join(problems) or None
    )


class AddressBook:
    """Every partner with its checked keys, by name and by address."""

    def __init__(self, entries: list[PartnerKeys]) -> None:
        self.entries = {e.partner.name: e for e in entries}

    def __getitem__(self, name: str) -> PartnerKeys:
        return self.entries[name]

    def senders(self) -> dict[str, Sender]:
        """Lower-case address → the inbound gate's view of the partner."""
        out = {}
        for e in self.entries.values():
            sender = Sender(e.partner.name, (e.smime,) if e.smime else (), e.pgp_fingerprint, e.problem)
            for address in e.partner.addresses:
                out[address.lower()] = sender
        return out

    def expiry(self, now: float | None = None) -> list[dict[str, object]]:
        """Per partner: format, fingerprint and days until its keys expire (for status and monitoring)."""
        return [
            {
                "partner": e.partner.name,
                "format": e.partner.format,
                "compression": e.partner.compression,
                "receipts": e.partner.receipts,
                # how identities change between us (the README: coercion, de-identified sending)
                "identity": ", ".join(
                    (
                        [
                            f"de-identified ({', '.join(sorted(e.partner.deidentify.options)) or 'basic profile'})"
                        ]
                        if e.partner.deidentify
                        else []
                    )
                    + (["IDs coerced on arrival"] if e.partner.coerce else [])
                )
                or "as is",
                "pgp_fingerprint": e.pgp_fingerprint or None,
                "days_left": None if (d := e.days_left(now)) is None else round(d, 1),
                "problem": e.problem,
            }
            for e in self.entries.values()
        ]


def load_address_book(settings: Settings, now: float | None = None) -> AddressBook:
    """Load and check every partner (see the module docstring)."""
    now = time.time() if now is None else now
    return AddressBook([load_partner(settings, i, p, now) for i, p in enumerate(settings.partners)])


@dataclass
class Keys:
    """Everything the stages need to sign, encrypt, decrypt and verify."""

    identity: Identity
    book: AddressBook
    pgp: OpenPgp | None


def load_keys(settings: Settings) -> Keys:
    """The gateway's own identity, the checked address book and, when configured, the OpenPGP keyring.

    The keyring under d_root/state/gnupg is rebuilt from the configuration at every start. A partner suspended,
    or whose keys expire within 30 days, is said in the log.
    """
    identity = Identity.load(settings.smime_cert.read_bytes(), settings.smime_key.read_bytes())
    book = load_address_book(settings)
    for entry in book.expiry():
        if entry["problem"]:
            log.error("partner %s is suspended: %s", entry["partner"], entry["problem"])
        elif entry["days_left"] is not None and float(entry["days_left"]) < 30:  # type: ignore[arg-type]
            log.warning("partner %s: keys expire in %s days", entry["partner"], entry["days_left"])
    pgp = None
    if settings.pgp is not None:
        passphrase = os.environ.get(settings.pgp.passphrase_env, "") if settings.pgp.passphrase_env else ""
        try:
            pgp = OpenPgp.rebuild(
                node_state(settings.d_root, settings.node) / "gnupg",
                settings.pgp.key,
                [p.pgp_key for p in settings.partners if p.pgp_key is not None],
                passphrase or None,
                max_output=min(settings.mail.max_unpacked_size, 8 * settings.fetch_cap),
            )
        except PgpError as exc:
            raise ConfigError(str(settings.source), "pgp.key", str(exc)) from None
    return Keys(identity, book, pgp)
