"""What a transfer's outcome is, in words: the one wording `status`, the web page and check_mk share.

An outbound transfer's outcome is the partner's receipt and what it proves (contents verified or not, what the
partner's PACS committed); an inbound one's is what each local PACS did with its instances (committed, accepted,
refused with the reason, still being tried).
"""

from __future__ import annotations

from typing import Any

RECEIPT_TEXT = {
    "awaited": "awaiting receipt",
    "confirmed": "confirmed by partner",
    "warning": "confirmed by partner with a warning",
    "failed": "failed at partner",
    "overdue": "no receipt yet (overdue)",
    "not-requested": "no receipts from this partner",
}
PACS_TEXT = {
    "accepted": "accepted",
    "committed": "committed",
    "stored": "stored, awaiting commitment",
    "rejected": "REFUSED",
    "not-committed": "NOT COMMITTED",
    "retry": "being retried",
    "pending": "waiting",
}
PROOF_TEXT = {"verified": ", contents verified", "not-verified": " (not verified)"}


def receipt_text(t: dict[str, Any]) -> str:
    """An outbound transfer's receipt state in words ("-" when there is none)."""
    receipt = t.get("receipt")
    if not receipt:
        return "-"
    text = RECEIPT_TEXT.get(str(receipt), str(receipt))
    text = f"{text}: {t['receipt_detail']}" if t.get("receipt_detail") else text
    proof = t.get("proof")
    if proof == "differs":
        text += f", {t.get('proof_detail') or 'contents differ'}"
    elif proof:
        text += PROOF_TEXT.get(str(proof), f" ({proof})")
    pacs_said = [c for c in t.get("chain") or () if "PACS" in c or "stored" in c]
    if pacs_said:
        text += "; " + "; ".join(pacs_said)
        if t.get("not_committed"):
            text += ": " + ", ".join(t["not_committed"][:10]) + (" …" if len(t["not_committed"]) > 10 else "")
    return f"{text} (CONTRADICTED: {t['receipt_conflict']})" if t.get("receipt_conflict") else text


def pacs_text(t: dict[str, Any]) -> str:
    """An inbound transfer's PACS outcomes: per PACS, how many instances in which state, a refusal's reason."""
    by_pacs: dict[str, list[str]] = {}
    for f in t.get("pacs") or ():
        words = f"{f['count']} {PACS_TEXT.get(str(f['state']), str(f['state']))}"
        if f["state"] in ("rejected", "not-committed", "retry") and f.get("error"):
            words += f" ({f['error']})"
        by_pacs.setdefault(str(f["pacs"]), []).append(words)
    return "; ".join(f"PACS {name}: {', '.join(parts)}" for name, parts in by_pacs.items()) or "-"


def outcome_text(t: dict[str, Any]) -> str:
    """The receipt of an outbound transfer, the PACS outcomes of an inbound one."""
    return receipt_text(t) if t.get("direction") == "out" else pacs_text(t)
