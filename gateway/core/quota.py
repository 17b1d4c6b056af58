"""What to drop when unauthenticated content exceeds its quota. Pure: holdings in, the ones to drop out.

Unauthenticated content is whatever came from the shared mailbox and has not been proven to come from a partner:
quarantined mails that failed before their signature was verified, and message/partial fragment groups (fragments
carry no signature). It may use at most `per_sender` bytes per From: address and `total` bytes in all; above
that the oldest holdings are dropped first (their metadata and reason stay), first per sender, then overall.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Holding:
    """One piece of unauthenticated content on D:."""

    kind: str  # "mail" (a held inbox item) | "fragments" (a fragment group)
    ref: str  # the inbox item id or the group key
    sender: str  # the From: address it claims (not proven)
    size: int
    since: float


def plan_drops(holdings: list[Holding], total: int, per_sender: int) -> list[Holding]:
    """The holdings to drop, oldest first, so that every sender stays within `per_sender` and all within `total`."""
    keep = sorted(holdings, key=lambda h: (h.since, h.ref))
    drops: list[Holding] = []
    used: dict[str, int] = {}
    for h in keep:
        used[h.sender] = used.get(h.sender, 0) + h.size
    for h in keep:
        if used[h.sender] > per_sender:
            drops.append(h)
            used[h.sender] -= h.size
    remaining = [h for h in keep if h not in drops]
    left = sum(h.size for h in remaining)
    for h in remaining:
        if left <= total:
            break
        drops.append(h)
        left -= h.size
    return sorted(drops, key=lambda h: (h.since, h.ref))
