"""[[partners]]: the address book. Key material is checked when the gateway starts (`gateway.addressbook`); here
each entry's shape, its format (one of `gateway.formats`) and the keys that format needs are checked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gateway import formats
from gateway.config.model import COMPRESSIONS, SPLITS, Partner, PgpSettings
from gateway.config.reader import Reader, check_addr, check_ae, check_name, parse_size
from gateway.config.routing import exclusions
from gateway.core.coerce import CoercionRule
from gateway.core.deid import OPTIONS, DeidSettings


def partners_section(root: Reader, file: Path, ae_title: str, pgp: PgpSettings | None) -> tuple[Partner, ...]:
    """[[partners]]: the address book; names, AE titles and addresses are unique."""
    partners_raw = root.get("partners", list, [])
    partners: list[Partner] = []
    for i, entry in enumerate(partners_raw):
        if not isinstance(entry, dict):
            raise root.fail(f"partners[{i}]", "must be a table ([[partners]])")
        p = root.within("partners", f"partners[{i}]", entry).within(i, f"partners[{i}]", entry)
        partner = _partner(p, file)
        p.done()
        for other in partners:
            if other.name == partner.name:
                raise p.fail("name", f"duplicate partner name {partner.name!r}")
            if other.ae_title == partner.ae_title:
                raise p.fail("ae_title", f"AE title {partner.ae_title!r} already routes to {other.name!r}")
            if shared := set(map(str.lower, other.addresses)) & set(map(str.lower, partner.addresses)):
                raise p.fail("addresses", f"{sorted(shared)[0]} already belongs to {other.name!r}")
        if partner.ae_title == ae_title:
            raise p.fail("ae_title", "must differ from gateway.ae_title")
        if formats.get(partner.format).key == "pgp" and pgp is None:
            raise p.fail(
                "format",
                f"partner {partner.name!r} uses {partner.format}: the [pgp] section (own key) is missing",
            )
        partners.append(partner)
    return tuple(partners)


def _partner_sizes(p: Reader) -> tuple[int, int]:
    """The partner's largest mail (0: the gateway's) and, for split = "partial", its one large message."""
    size = p.get("max_mail_size", (str, int), 0)
    max_message = p.get("max_message_size", (str, int), "200MB")
    try:
        size = parse_size(size) if size else 0
        max_message = parse_size(max_message)
    except ValueError as exc:
        raise p.fail("max_mail_size", str(exc)) from None
    if size and size < 64 * 1024:
        raise p.fail("max_mail_size", "must be at least 64KB")
    return size, max_message


def _partner(p: Reader, file: Path) -> Partner:
    """One [[partners]] entry; key material is checked by `gateway.addressbook` when the gateway starts."""
    name = p.get("name", str, check=check_name)
    if "address" in p.table and "addresses" in p.table:
        raise p.fail("addresses", "give address or addresses, not both")
    if "addresses" in p.table:
        addresses = p.get("addresses", list)
        if not addresses:
            raise p.fail("addresses", "needs at least one address")
        for a in addresses:
            if not isinstance(a, str) or check_addr(a):
                raise p.fail("addresses", f"entry {a!r} is not a mail address")
    else:
        addresses = [p.get("address", str, check=check_addr)]
    fmt = p.get(
        "format", str, "smime", check=lambda v: None if v in formats.names() else " or ".join(formats.names())
    )
    smime_cert = p.path("smime_cert") if "smime_cert" in p.table else None
    pgp_key = p.path("pgp_key") if "pgp_key" in p.table else None
    fingerprint = p.get(
        "pgp_fingerprint",
        str,
        "",
        check=lambda v: (
            None
            if re.fullmatch(r"[0-9A-Fa-f]{40}", v.replace(" ", ""))
            else "40 hex digits (a v4 fingerprint)"
        ),
    )
    needs = formats.get(fmt).key
    if needs == "smime" and smime_cert is None:
        raise p.fail("smime_cert", f"missing: partner {name!r} uses {fmt} and needs its S/MIME certificate")
    if needs == "pgp" and pgp_key is None:
        raise p.fail(
            "pgp_key", f"missing: partner {name!r} uses {fmt} and needs its OpenPGP public key (armored file)"
        )
    size, max_message = _partner_sizes(p)
    return Partner(
        name=name,
        addresses=tuple(addresses),
        ae_title=p.get("ae_title", str, check=check_ae),
        format=fmt,
        smime_cert=smime_cert,
        pgp_key=pgp_key,
        pgp_fingerprint=fingerprint.replace(" ", "").upper(),
        institution=p.get("institution", str, ""),
        location=p.get("location", str, ""),
        max_mail_size=size,
        compression=p.get(
            "compression",
            str,
            "none",
            check=lambda v: None if v in COMPRESSIONS else " or ".join(COMPRESSIONS),
        ),
        receipts=p.get("receipts", bool, True),
        split=p.get("split", str, "sets", check=lambda v: None if v in SPLITS else " or ".join(SPLITS)),
        max_message_size=max_message,
        **_what_it_gets(p, name),
    )


def _what_it_gets(p: Reader, name: str) -> dict[str, Any]:
    """What a partner is never sent, and how identities change between us: `exclude`, `coerce`, `deidentify`."""
    return {
        "exclude": exclusions(p),
        "coerce": _coerce(p, name) if "coerce" in p.table else None,
        "deidentify": _deidentify(p) if "deidentify" in p.table else None,
    }


def _deidentify(p: Reader) -> DeidSettings:
    """`deidentify = { options = [...], allow_burned_in = false }`."""
    d = p.table_of("deidentify")
    options = d.get("options", list, [])
    if bad := [o for o in options if o not in OPTIONS]:
        raise d.fail("options", f"{bad[0]!r}: use {', '.join(OPTIONS)}")
    settings = DeidSettings(frozenset(options), d.get("allow_burned_in", bool, False))
    d.done()
    return settings


def _coerce(p: Reader, name: str) -> CoercionRule:
    """`coerce = { issuer = "...", id_prefix = "...", universal_entity_id = "...", reconcile = "pacs" }`."""
    c = p.table_of("coerce")
    issuer = c.get("issuer", str, name, check=lambda v: None if 0 < len(v) <= 64 else "1 to 64 characters")
    rule = CoercionRule(
        issuer=issuer,
        id_prefix=c.get(
            "id_prefix", str, "", check=lambda v: None if len(v) <= 16 else "at most 16 characters"
        ),
        universal_entity_id=c.get("universal_entity_id", str, ""),
        universal_entity_id_type=c.get(
            "universal_entity_id_type",
            str,
            "ISO",
            check=lambda v: (
                None
                if v in ("DNS", "EUI64", "ISO", "URI", "UUID", "X400", "X500")
                else "ISO, DNS, URI, UUID, …"
            ),
        ),
        reconcile=c.get("reconcile", str, ""),
    )
    c.done()
    return rule
