"""Routing rules: which partners an instance received over DICOM goes to, and why.

Pure: rules are frozen data read from the configuration (`gateway.config.routing`); `decide` takes the facts of one
instance (`Facts`: who sent it, to which AE title, from where, and the DICOM attributes the rules ask about) and
the time its study arrived, and returns the partners with the rule that chose each, plus a trace of every rule
for `route --explain`. No clock, no files: the route stage reads the headers and passes `arrived` in.

Semantics (the README's "Routing" section says the same for operators):

- Rules are evaluated in order, for each instance. Every rule whose conditions all hold sends the instance to its
  partners (`to`); several rules may match, and the instance goes to the union of their partners. A matching rule
  with `stop = true` ends the evaluation for that instance (a rule with `to = []` and `stop = true` keeps an
  instance here whatever later rules say).
- Conditions: `calling_ae`, `called_ae` (AE titles), `source` (networks, CIDR), `attributes` (DICOM keywords →
  patterns), `hours` and `days` (when the study's first instance arrived, local time of the gateway, so that a
  study is never split by the clock). A condition given as a list holds when any of its entries matches.
- Patterns: `re:…` is a regular expression matched against the whole value (add `(?i)` to ignore case); a value
  with `*` or `?` is a wildcard (DICOM style); anything else is compared exactly. Wildcards and exact values
  ignore case and surrounding blanks. A multi-valued attribute is matched as its values joined by `\\`
  (`ImageType` `ORIGINAL\\PRIMARY\\LOCALIZER` matches `*LOCALIZER*`). An attribute missing from the instance is the
  empty string.
- Exclusions (`exclude`, on a rule or on a partner): a list of attribute tables; an instance matching every
  pattern of one table is not sent to that rule's (or that partner's) partners. Per instance, so an excluded
  series (dose report, scout, secondary capture with burnt-in annotation) is left out and the rest of the study goes.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pydicom.multival import MultiValue

CALLED_AE_RULE = (
    "called AE title"  # the name of the built-in rules (one per partner, after the configured ones)
)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class PatternError(ValueError):
    """A pattern that cannot be used (an invalid regular expression)."""


@dataclass(frozen=True)
class Pattern:
    """One value to match: exact, wildcard or regular expression (see the module docstring)."""

    text: str

    def __post_init__(self) -> None:
        if self.text.startswith("re:"):
            try:
                re.compile(self.text[3:])
            except re.error as exc:
                raise PatternError(f"invalid regular expression {self.text[3:]!r}: {exc}") from None

    @property
    def kind(self) -> str:
        if self.text.startswith("re:"):
            return "regex"
        return "wildcard" if any(c in self.text for c in "*?") else "exact"

    def matches(self, value: str) -> bool:
        if self.kind == "regex":
            return re.fullmatch(self.text[3:], value) is not None
        value, want = value.strip().casefold(), self.text.strip().casefold()
        if self.kind == "wildcard":
            return fnmatch.fnmatchcase(value, want.replace("[", "[[]"))
        return value == want

    def __str__(self) -> str:
        return self.text


def patterns(values: Iterable[str]) -> tuple[Pattern, ...]:
    """Patterns from configuration strings."""
    return tuple(Pattern(v) for v in values)


def _any(pats: Sequence[Pattern], value: str) -> bool:
    return any(p.matches(value) for p in pats)


def _shown(pats: Sequence[Pattern]) -> str:
    return " | ".join(str(p) for p in pats)


Exclusion = Mapping[str, tuple[Pattern, ...]]  # DICOM keyword → patterns; all must match


def excluded_by(exclusions: Sequence[Exclusion], attributes: Mapping[str, str]) -> int | None:
    """The index of the first exclusion the instance matches, or None."""
    for n, ex in enumerate(exclusions):
        if all(_any(pats, attributes.get(k, "")) for k, pats in ex.items()):
            return n
    return None


def describe_exclusion(ex: Exclusion) -> str:
    return ", ".join(f"{k} = {_shown(p)}" for k, p in ex.items())


@dataclass(frozen=True)
class Hours:
    """A daily window in minutes after midnight; start > end wraps over midnight (18:00-07:30)."""

    start: int
    end: int

    def holds(self, minute: int) -> bool:
        if self.start <= self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"

    @staticmethod
    def parse(text: str) -> Hours:
        """`HH:MM-HH:MM` (raises ValueError)."""
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
        if not m:
            raise ValueError("must be HH:MM-HH:MM, e.g. 18:00-07:30")
        h1, m1, h2, m2 = map(int, m.groups())
        if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59:
            raise ValueError("hours 0-24, minutes 0-59")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise ValueError("start and end are the same: leave `hours` out for the whole day")
        return Hours(start, end)


@dataclass(frozen=True)
class Rule:
    """One routing rule (see the module docstring)."""

    name: str
    to: tuple[str, ...]
    calling_ae: tuple[Pattern, ...] = ()
    called_ae: tuple[Pattern, ...] = ()
    source: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    attributes: Mapping[str, tuple[Pattern, ...]] = field(default_factory=dict)
    hours: Hours | None = None
    days: frozenset[int] = frozenset()  # 0 = Monday; empty: every day
    exclude: tuple[Exclusion, ...] = ()
    stop: bool = False

    def keywords(self) -> set[str]:
        """The DICOM attributes this rule needs to be read from an instance."""
        return set(self.attributes) | {k for ex in self.exclude for k in ex}

    def mismatch(self, facts: Facts, arrived: dt.datetime) -> str | None:
        """Why the rule does not hold for the instance (the first condition that fails), or None when it does."""
        if self.calling_ae and not _any(self.calling_ae, facts.calling_ae):
            return f"calling AE {facts.calling_ae or '-'!s} is not {_shown(self.calling_ae)}"
        if self.called_ae and not _any(self.called_ae, facts.called_ae):
            return f"called AE {facts.called_ae or '-'!s} is not {_shown(self.called_ae)}"
        if self.source and not _in_networks(facts.peer, self.source):
            return f"source {facts.peer or '-'} is not in {' | '.join(map(str, self.source))}"
        if self.days and arrived.weekday() not in self.days:
            days = ", ".join(WEEKDAYS[d] for d in sorted(self.days))
            return f"arrived on a {WEEKDAYS[arrived.weekday()]}, not {days}"
        if self.hours and not self.hours.holds(arrived.hour * 60 + arrived.minute):
            return f"arrived at {arrived:%H:%M}, outside {self.hours}"
        for key, pats in self.attributes.items():
            value = facts.attributes.get(key, "")
            if not _any(pats, value):
                shown = "(value not shown)" if is_patient_keyword(key) else repr(value)
                return f"{key} {shown} is not {_shown(pats)}"
        return None


def is_patient_keyword(keyword: str) -> bool:
    """Attributes about the patient (name, IDs, birth date, address, …): matched, never shown in an explanation."""
    return keyword.startswith(("Patient", "OtherPatient", "IssuerOfPatient"))


def _in_networks(peer: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in n for n in networks)


@dataclass(frozen=True)
class Facts:
    """What routing knows about one instance."""

    calling_ae: str
    called_ae: str
    peer: str
    attributes: Mapping[str, str]  # DICOM keyword → value as text (only the keywords the rules use)


@dataclass(frozen=True)
class RuleOutcome:
    """One rule's verdict for one instance: `None` reason = it matched."""

    rule: str
    reason: str | None
    sent_to: tuple[str, ...] = ()  # partners this rule added
    excluded: tuple[tuple[str, str], ...] = ()  # (partner, which exclusion) left out by an exclusion
    stopped: bool = False


@dataclass(frozen=True)
class Decision:
    """Where one instance goes: partner → the rule that chose it; and every rule's outcome, in order."""

    partners: Mapping[str, str]
    trace: tuple[RuleOutcome, ...]


@dataclass(frozen=True)
class RuleSet:
    """The configured rules, the built-in called-AE rules after them, and each partner's exclusions."""

    rules: tuple[Rule, ...] = ()
    partner_exclude: Mapping[str, tuple[Exclusion, ...]] = field(default_factory=dict)

    def keywords(self) -> set[str]:
        """Every DICOM keyword the rules need read from an instance's header (empty: no header is read)."""
        out: set[str] = set()
        for r in self.rules:
            out |= r.keywords()
        for exclusions in self.partner_exclude.values():
            out |= {k for ex in exclusions for k in ex}
        return out

    def called_aes(self) -> set[str]:
        """AE titles a rule names exactly as called AE: the DICOM receiver accepts them."""
        return {p.text.strip() for r in self.rules for p in r.called_ae if p.kind == "exact"}

    def decide(self, facts: Facts, arrived: dt.datetime) -> Decision:
        """Evaluate every rule for one instance."""
        chosen: dict[str, str] = {}
        trace: list[RuleOutcome] = []
        for rule in self.rules:
            reason = rule.mismatch(facts, arrived)
            if reason is not None:
                trace.append(RuleOutcome(rule.name, reason))
                continue
            added, left_out = [], []
            for partner in rule.to:
                ex = excluded_by(rule.exclude, facts.attributes)
                where = f"rule exclusion {ex + 1}" if ex is not None else None
                if where is None:
                    pex = excluded_by(self.partner_exclude.get(partner, ()), facts.attributes)
                    where = f"partner exclusion {pex + 1}" if pex is not None else None
                if where is not None:
                    left_out.append((partner, where))
                    continue
                if partner not in chosen:
                    chosen[partner] = rule.name
                    added.append(partner)
            trace.append(RuleOutcome(rule.name, None, tuple(added), tuple(left_out), rule.stop))
            if rule.stop:
                break
        return Decision(chosen, tuple(trace))

    def exclusion_for(self, partner: str, attributes: Mapping[str, str]) -> str | None:
        """For a re-send: which of the partner's own exclusions leaves the instance out, described, or None."""
        exclusions = self.partner_exclude.get(partner, ())
        n = excluded_by(exclusions, attributes)
        return None if n is None else describe_exclusion(exclusions[n])


def called_ae_rules(partners: Iterable[tuple[str, str]]) -> tuple[Rule, ...]:
    """The built-in rules, one per (partner name, AE title): an instance sent to a partner's AE title goes to it."""
    return tuple(
        Rule(name=f"{CALLED_AE_RULE} {ae}", to=(name,), called_ae=(Pattern(ae),)) for name, ae in partners
    )


def attribute_text(value: object) -> str:
    """A DICOM element's value as routing matches it: multi-values joined by `\\`, sequences and bytes empty."""
    if value is None or isinstance(value, bytes | bytearray | memoryview):
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)
