"""Stage 2, route: when a study has been quiet for `stability_delay`, decide where its new instances go (the routing
rules, `gateway.core.routing`) and open one outbound transfer per partner.

A study is complete ("stable", as Orthanc calls it) when no instance arrived for `stability_delay` seconds, the
router has seen the number of its instances waiting for routing unchanged for as long, and none of its instances
is still waiting in this node's intake (acknowledged to the modality, not yet in the catalog). The last two
matter when the catalog was away: instances received long ago are then indexed late, perhaps in several batches
(a Galera member stalls its commits for seconds while a dead peer is evicted), and must not make a study look
stable, and leave in two transfers, for having been received long ago. The count is watched in memory: a router
that starts (or a cluster node that takes the role) waits `stability_delay` before it routes anything. Then
each instance received over DICOM and not routed yet is decided once: the headers the rules need are read, every
rule is evaluated, and the decisions (instance → partners, with the rule) are stored with the instances marked
routed, in one transaction. Transfers are made from stored decisions, so a crash between the two steps loses
nothing: the next round makes the transfers. Instances arriving after a study was routed are routed in a round of
their own (the time windows look at the study's first arrival, so they get the same answer).

`explain` answers `route --explain`: the rules as configured now, applied to a stored study, instance by
instance, grouped by series, beside what was decided when the study arrived.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import pydicom

from gateway.catalog import Catalog
from gateway.catalog.routing import RoutableInstance
from gateway.core.routing import Facts, RuleOutcome, RuleSet, attribute_text
from gateway.stages import wait_woken
from gateway.stages.context import Stage, StageContext

log = logging.getLogger(__name__)


def read_attributes(path: Path, keywords: Iterable[str]) -> dict[str, str]:
    """The named attributes of a stored instance as text (missing or unreadable: empty strings)."""
    keys = sorted(keywords)
    if not keys:
        return {}
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keys)
    except Exception:  # a file routing cannot read matches no attribute condition; it was checked on arrival
        return {}
    return {k: attribute_text(ds[k].value) if k in ds else "" for k in keys}


def facts_of(root: Path, instances: list[RoutableInstance], keywords: set[str]) -> list[Facts]:
    """What the rules see of each instance (reads headers only when a rule asks for an attribute)."""
    return [
        Facts(i.origin, i.called_ae, i.peer, read_attributes(root / i.path, keywords) if not i.purged else {})
        for i in instances
    ]


def arrival(first_seen: float | None) -> dt.datetime:
    """The local time routing's `hours` and `days` look at."""
    return dt.datetime.fromtimestamp(first_seen if first_seen is not None else time.time())


class Router(Stage):
    """Routes stable studies and turns the decisions into pending outbound transfers."""

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        # study → (its instances waiting for routing, since when the router has seen that count)
        self.seen: dict[str, tuple[int, float]] = {}
        # studies with instances this node acknowledged but has not indexed yet (the intake's, set by the service)
        self.waiting: Callable[[], Collection[str]] = frozenset

    @property
    def rules(self) -> RuleSet:
        return self.settings.routing

    async def route_study(self, study_uid: str, now: float) -> int:
        """Decide every unrouted instance of a study; return how many (instance, partner) routes are new."""
        instances = await self.catalog.routable(study_uid, unrouted_only=True)
        if not instances:
            return 0
        arrived = arrival(await self.catalog.study_first_seen(study_uid))
        facts = await asyncio.to_thread(facts_of, self.storage.root, instances, self.rules.keywords())
        decisions = {
            i.sop_uid: self.rules.decide(f, arrived).partners for i, f in zip(instances, facts, strict=True)
        }
        new = await self.catalog.record_routes(decisions, now)
        per_partner = Counter(p for partners in decisions.values() for p in partners)
        kept = sum(1 for partners in decisions.values() if not partners)
        log.info(
            "study %s: %d instances routed (%s); %d stay here",
            study_uid,
            len(instances),
            ", ".join(f"{p} {n}" for p, n in sorted(per_partner.items())) or "to nobody",
            kept,
        )
        return new

    async def run_once(self, now: float) -> int:
        """Route every study that is stable at `now` and create its transfers; return how many transfers."""
        quiet_since = now - self.settings.stability_delay
        waiting = self.waiting()
        seen: dict[str, tuple[int, float]] = {}
        for study_uid, count, last_received in await self.catalog.unrouted_studies():
            before = self.seen.get(study_uid)
            seen[study_uid] = (count, before[1] if before is not None and before[0] == count else now)
            if (
                last_received <= quiet_since
                and seen[study_uid][1] <= quiet_since
                and study_uid not in waiting
            ):
                await self.route_study(study_uid, now)
                del seen[study_uid]
        self.seen = seen
        created = 0
        for study_uid, partner in await self.catalog.pending_routes():
            transfer_id = uuid.uuid4().hex
            count = await self.catalog.create_out_transfer(transfer_id, partner, study_uid, now)
            if count:
                created += 1
                log.info(
                    "transfer %s: study %s stable, %d instances for partner %s",
                    transfer_id,
                    study_uid,
                    count,
                    partner,
                )
        if created:
            self.wakes.packager.set()
        return created

    async def run_forever(self) -> None:
        """Check on every new instance and at least every second; never dies."""
        tick = max(0.2, min(1.0, self.settings.stability_delay / 4 or 0.2))
        while True:
            await wait_woken(self.wakes.router, tick)
            try:
                await self.run_once(time.time())
                self.guard.ok()
            except Exception as exc:
                if not await self.guard.pause(exc):
                    return


def _series_label(i: RoutableInstance, modality: str, counts: Counter[str]) -> str:
    n = counts[i.series_uid]
    return f"series {i.series_uid} ({modality or '?'}, {n} instance{'s' if n != 1 else ''})"


def _outcome_text(o: RuleOutcome) -> str:
    if o.reason is not None:
        return f"no match: {o.reason}"
    parts = [f"match → {', '.join(o.sent_to)}" if o.sent_to else "match"]
    parts += [f"not to {p} ({why})" for p, why in o.excluded]
    if o.stopped:
        parts.append("stop: later rules not evaluated")
    return "; ".join(parts)


async def explain(rules: RuleSet, catalog: Catalog, root: Path, study_uid: str) -> list[str]:
    """`route --explain`: how the rules as configured now decide each series of a stored study, and what was
    decided when it arrived. Lines of text for an operator (attribute values the rules look at may appear; patient
    identifiers are masked by the rules' own messages)."""
    instances = await catalog.routable(study_uid, unrouted_only=False)
    if not instances:
        return [f"study {study_uid}: not in the catalog"]
    first_seen = await catalog.study_first_seen(study_uid)
    arrived = arrival(first_seen)
    keywords = rules.keywords() | {"Modality"}
    facts = await asyncio.to_thread(facts_of, root, instances, keywords)
    counts = Counter(i.series_uid for i in instances)
    lines = [
        f"study {study_uid}: {len(instances)} instances in {len(counts)} series, first arrived "
        f"{arrived:%Y-%m-%d %H:%M} ({arrived:%a}); {sum(i.purged for i in instances)} no longer on D:"
    ]
    senders = Counter(
        f"from {i.origin or '-'} to {i.called_ae or '-'} at {i.peer or '-'} ({i.source})" for i in instances
    )
    lines += [f"  {n} instance{'s' if n != 1 else ''} {s}" for s, n in senders.items()]
    decisions = [rules.decide(f, arrived) for f in facts]
    by_rule: dict[int, Counter[str]] = {}
    for i, f, d in zip(instances, facts, decisions, strict=True):
        label = _series_label(i, f.attributes.get("Modality", ""), counts)
        for n, outcome in enumerate(d.trace):
            by_rule.setdefault(n, Counter())[f"{label}: {_outcome_text(outcome)}"] += 1
    for n, rule in enumerate(rules.rules):
        lines.append(f"rule {n + 1} {rule.name!r} → {', '.join(rule.to) or '(keep here)'}")
        seen = by_rule.get(n)
        if not seen:
            lines.append("  not evaluated (an earlier rule stopped)")
            continue
        lines += [f"  {text}" for text in seen]
    totals = Counter(p for d in decisions for p in d.partners)
    kept = sum(1 for d in decisions if not d.partners)
    lines.append(
        "now: "
        + (", ".join(f"{p} {n} instances" for p, n in sorted(totals.items())) or "to no partner")
        + f"; {kept} stay here"
    )
    decided = await catalog.routes_of(study_uid)
    waiting = sum(1 for i in instances if i.routed_at is None)
    done = Counter(
        (p, rule, transfer or "not yet in a transfer")
        for routes in decided.values()
        for p, (rule, transfer) in routes.items()
    )
    lines.append(
        "decided on arrival: "
        + (
            "; ".join(f"{p} {n} (rule {rule!r}, transfer {t})" for (p, rule, t), n in sorted(done.items()))
            or "to no partner"
        )
        + (f"; {waiting} not routed yet (the study is not stable yet)" if waiting else "")
    )
    return lines
