"""[routing] and each partner's `exclude`: the rules of `gateway.core.routing`, checked where they are read.

[routing]
by_called_ae = true          # the built-in rules: an instance sent to a partner's AE title goes to it

[[routing.rules]]
name = "night CT"            # shown by `route --explain` and recorded with each decision
to = ["telerad"]             # partners ([] with stop = true: keep here)
calling_ae = ["CT1", "CT*"]  # optional conditions, see gateway/core/routing.py
called_ae = "GATEWAY_A"
source = ["10.1.0.0/16"]
attributes = { Modality = "CT", StudyDescription = "re:(?i).*head.*" }
hours = "18:00-07:30"
days = ["sat", "sun"]
exclude = [{ Modality = "SR" }, { ImageType = "*LOCALIZER*" }]
stop = false
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydicom.datadict import keyword_dict

from gateway.config.model import Partner
from gateway.config.reader import Reader
from gateway.core.routing import (
    WEEKDAYS,
    Exclusion,
    Hours,
    PatternError,
    Rule,
    RuleSet,
    called_ae_rules,
    patterns,
)


def _strings(r: Reader, name: str) -> tuple[str, ...]:
    """A string or a list of strings."""
    value = r.get(name, (str, list), [])
    values = [value] if isinstance(value, str) else value
    if not all(isinstance(v, str) and v for v in values):
        raise r.fail(name, "must be a string or a list of non-empty strings")
    return tuple(values)


def _pattern_table(r: Reader, name: str, table: Any) -> dict[str, tuple[Any, ...]]:
    """{DICOM keyword = pattern or [patterns]} with every keyword checked against the DICOM dictionary."""
    if not isinstance(table, dict) or not table:
        raise r.fail(name, 'must be a table of DICOM keywords, e.g. { Modality = "CT" }')
    out = {}
    for key, value in table.items():
        if key not in keyword_dict:
            raise r.fail(
                name, f"{key!r} is not a DICOM keyword (e.g. Modality, StudyDescription, BodyPartExamined)"
            )
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise r.fail(name, f"{key}: a pattern or a list of patterns")
        try:
            out[key] = patterns(values)
        except PatternError as exc:
            raise r.fail(name, f"{key}: {exc}") from None
    return out


def exclusions(r: Reader, name: str = "exclude") -> tuple[Exclusion, ...]:
    """`exclude = [{ keyword = pattern, … }, …]` of a rule or a partner."""
    raw = r.get(name, list, [])
    return tuple(_pattern_table(r, name, t) for t in raw)


def _rule(r: Reader, n: int, partners: set[str]) -> Rule:
    name = r.get("name", str, f"rule {n + 1}", check=lambda v: None if v.strip() else "must not be empty")
    to = r.get("to", list)
    for p in to:
        if p not in partners:
            raise r.fail(
                "to", f"no partner named {p!r} (configured: {', '.join(sorted(partners)) or 'none'})"
            )
    stop = r.get("stop", bool, False)
    if not to and not stop:
        raise r.fail("to", "is empty: name partners, or set stop = true to keep matching instances here")
    try:
        calling, called = patterns(_strings(r, "calling_ae")), patterns(_strings(r, "called_ae"))
    except PatternError as exc:
        raise r.fail("calling_ae", str(exc)) from None
    networks = []
    for net in _strings(r, "source"):
        try:
            networks.append(ipaddress.ip_network(net, strict=False))
        except ValueError:
            raise r.fail("source", f"{net!r} is not a network (10.1.0.0/16) or address") from None
    hours = None
    if "hours" in r.table:
        try:
            hours = Hours.parse(r.get("hours", str))
        except ValueError as exc:
            raise r.fail("hours", str(exc)) from None
    days = _strings(r, "days")
    if bad := [d for d in days if d.lower() not in WEEKDAYS]:
        raise r.fail("days", f"{bad[0]!r}: use {', '.join(WEEKDAYS)}")
    attributes = _pattern_table(r, "attributes", r.get("attributes", dict)) if "attributes" in r.table else {}
    return Rule(
        name=name,
        to=tuple(dict.fromkeys(to)),
        calling_ae=calling,
        called_ae=called,
        source=tuple(networks),
        attributes=attributes,
        hours=hours,
        days=frozenset(WEEKDAYS.index(d.lower()) for d in days),
        exclude=exclusions(r),
        stop=stop,
    )


def partner_exclusions(partner: Partner) -> tuple[Exclusion, ...]:
    """What never goes to a partner: its own `exclude`, and for a de-identified partner, images with burnt-in
    annotation (Burned In Annotation YES: pixels de-identification does not clean) unless it takes them."""
    burned: tuple[Exclusion, ...] = ()
    if partner.deidentify is not None and not partner.deidentify.allow_burned_in:
        burned = ({"BurnedInAnnotation": patterns(["YES"])},)
    return partner.exclude + burned


def routing_section(
    root: Reader, partners: list[tuple[str, str]], partner_exclude: dict[str, tuple[Exclusion, ...]]
) -> RuleSet:
    """[routing]: the configured rules, then (unless `by_called_ae = false`) one rule per partner's AE title."""
    r = root.table_of("routing", required=False)
    names = {name for name, _ in partners}
    rules: list[Rule] = []
    for i, entry in enumerate(r.get("rules", list, [])):
        if not isinstance(entry, dict):
            raise r.fail(f"rules[{i}]", "must be a table ([[routing.rules]])")
        rr = r.within(i, f"routing.rules[{i}]", entry)
        rule = _rule(rr, i, names)
        rr.done()
        if any(rule.name == other.name for other in rules):
            raise rr.fail("name", f"duplicate rule name {rule.name!r}")
        rules.append(rule)
    if r.get("by_called_ae", bool, True):
        rules += called_ae_rules(partners)
    r.done()
    return RuleSet(tuple(rules), dict(partner_exclude))
