"""Proof of delivery, judged: what a partner's receipt proves about one of our mails, and how a transfer's chain
(sent → stored at the partner → committed by the partner's PACS) reads. Pure.

A receipt proves content when its `Received-Content-MIC` equals the digest of the content we signed and every
instance we put into the mail is listed with the SHA-256 of what we sent (the file as it went into the mail, after
any compression for this partner). An instance missing from the list, or listed with another digest, "differs".
A plain RFC 3798 MDN proves nothing beyond the partner's word: "not verified".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.core.mdn import PACS_STATES, Receipt

VERIFIED, DIFFERS, NOT_VERIFIED = "verified", "differs", "not-verified"
MISSING = "missing"  # a partner state of its own: the instance is not in the partner's list


@dataclass(frozen=True)
class Verdict:
    """What one receipt proves: `proof` (VERIFIED, DIFFERS or NOT_VERIFIED), why, and per instance we sent what
    the partner reports: (SHA-256 it stored or None, PACS state or MISSING, reason)."""

    proof: str
    detail: str
    instances: dict[str, tuple[str | None, str, str]]


def judge(sent_mic: str | None, sent: Mapping[str, str], receipt: Receipt) -> Verdict:
    """Compare a receipt with what we sent in that mail (`sent`: SOP Instance UID → SHA-256)."""
    if receipt.stored is None and receipt.mic is None:
        return Verdict(NOT_VERIFIED, receipt.unreadable or "the partner's receipt carries no digests", {})
    listed = {s.uid: s for s in receipt.stored or ()}
    instances: dict[str, tuple[str | None, str, str]] = {}
    differing = []
    for uid, sha in sent.items():
        got = listed.get(uid)
        if got is None:
            instances[uid] = (None, MISSING, "not in the partner's receipt")
            if receipt.stored is not None:
                differing.append(uid)
            continue
        instances[uid] = (got.sha256, got.pacs, got.reason)
        if got.sha256 != sha:
            differing.append(uid)
    problems = []
    if receipt.mic is not None and sent_mic is not None and receipt.mic != sent_mic:
        problems.append("the mail's digest differs")
    if differing:
        problems.append(f"{len(differing)} instances differ")
    if problems:
        return Verdict(DIFFERS, "; ".join(problems), instances)
    if receipt.stored is None:
        return Verdict(NOT_VERIFIED, receipt.unreadable or "the receipt lists no instances", instances)
    return Verdict(VERIFIED, "", instances)


def worst(states: Iterable[str]) -> str:
    """The worst of several PACS states (`mdn.PACS_STATES` order; MISSING is worst of all)."""
    order = {s: n for n, s in enumerate((*PACS_STATES, MISSING))}
    return max(states, key=lambda s: order.get(s, len(order)), default="none")


def chain(proofs: Counter[str], pacs: Counter[str], receipts_pending: int) -> tuple[str, str]:
    """How a sent transfer's proof reads, from its mails' proofs and its instances' partner PACS states:
    (content, partner's PACS), e.g. ("contents verified", "committed by partner's PACS")."""
    if receipts_pending:
        content = f"awaiting {receipts_pending} receipts"
    elif proofs.get(DIFFERS):
        content = "contents differ"
    elif proofs.get(NOT_VERIFIED):
        content = "not verified"
    elif proofs.get(VERIFIED):
        content = "contents verified"
    else:
        content = ""
    total = sum(pacs.values())
    if not total:
        return content, ""
    bad = {s: n for s, n in pacs.items() if s in ("not-committed", "refused", MISSING, "pending")}
    if bad:
        said = ", ".join(f"{n} {s}" for s, n in sorted(bad.items()))
        return content, f"partner's PACS: {said} of {total}"
    if pacs.get("committed") == total:
        return content, "committed by partner's PACS"
    if pacs.get("none") == total:
        return content, "stored at partner (no PACS)"
    return content, "stored (not committed)"
