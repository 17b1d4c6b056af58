"""The states of transfers and mails, and the only moves allowed between them.

A move that is not in a table is a bug: `check_transfer` / `check_mail` raise `IllegalTransition`.

Outbound transfer:   pending ──package──▶ packaged ──all mails 250──▶ sent
                        │                    │
                        └──────────┬─────────┘
                                   ▼
                                 failed   (5xx, too large, retries exhausted; the reason is kept)
                                   └──operator releases a held mail──▶ packaged

Inbound transfer:    receiving ──all parts ingested──▶ complete

Outbound mail:       queued ──250──▶ sent        queued ──4xx/timeout──▶ queued (attempts+1, next_attempt)
                        └──5xx / too old──▶ failed
Inbound mail:        fetched ──▶ ingested | duplicate | quarantined | fragment | receipt
                     quarantined ──operator discards──▶ discarded

A partner's receipt for one outbound mail (RFC 3798 disposition), `settle_receipt`:

    none ──▶ displayed | displayed/warning | deleted         final: a later receipt never overwrites them
    none ──▶ deleted/error ──▶ displayed | displayed/warning | deleted    (held at the partner: its operator
                                                                          released or discarded the mail)

A later receipt that says something the table does not allow is a contradiction: shown beside the answer that
stands, never resolved silently. Receipts count only when signed by the partner (see `stages.ingest`).
"""

from __future__ import annotations

from enum import StrEnum


class IllegalTransition(RuntimeError):
    """A state change that the transition table does not allow."""


class TransferState(StrEnum):
    """States of a transfer (one study to or from one partner)."""

    PENDING = "pending"
    PACKAGED = "packaged"
    SENT = "sent"
    FAILED = "failed"
    RECEIVING = "receiving"
    COMPLETE = "complete"


class MailState(StrEnum):
    """States of one mail."""

    QUEUED = "queued"
    SENT = "sent"
    FAILED = "failed"
    FETCHED = "fetched"
    INGESTED = "ingested"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    FRAGMENT = "fragment"  # a message/partial piece, kept until its message is complete
    RECEIPT = "receipt"  # a partner's MDN for one of our mails
    DISCARDED = "discarded"  # a quarantined mail an operator gave up on


TRANSFER_MOVES: dict[TransferState, frozenset[TransferState]] = {
    TransferState.PENDING: frozenset({TransferState.PACKAGED, TransferState.FAILED}),
    TransferState.PACKAGED: frozenset({TransferState.SENT, TransferState.FAILED}),
    TransferState.SENT: frozenset(),
    TransferState.FAILED: frozenset({TransferState.PENDING, TransferState.PACKAGED}),  # an operator's retry
    TransferState.RECEIVING: frozenset({TransferState.COMPLETE}),
    TransferState.COMPLETE: frozenset(),
}

MAIL_MOVES: dict[MailState, frozenset[MailState]] = {
    MailState.QUEUED: frozenset({MailState.QUEUED, MailState.SENT, MailState.FAILED}),
    MailState.SENT: frozenset(),
    MailState.FAILED: frozenset({MailState.QUEUED}),  # an operator's retry
    MailState.FETCHED: frozenset(
        {
            MailState.INGESTED,
            MailState.DUPLICATE,
            MailState.QUARANTINED,
            MailState.FRAGMENT,
            MailState.RECEIPT,
        }
    ),
    MailState.INGESTED: frozenset(),
    MailState.DUPLICATE: frozenset(),
    MailState.QUARANTINED: frozenset(
        {MailState.FETCHED, MailState.DISCARDED}
    ),  # an operator's retry or discard
    MailState.DISCARDED: frozenset(),
    MailState.FRAGMENT: frozenset(),
    MailState.RECEIPT: frozenset(),
}


def check_transfer(old: TransferState | str, new: TransferState) -> None:
    """Raise unless old → new is allowed for a transfer."""
    if new not in TRANSFER_MOVES[TransferState(old)]:
        raise IllegalTransition(f"transfer {old} → {new}")


def check_mail(old: MailState | str, new: MailState) -> None:
    """Raise unless old → new is allowed for a mail."""
    if new not in MAIL_MOVES[MailState(old)]:
        raise IllegalTransition(f"mail {old} → {new}")


def retry_delay(attempts: int, base: float = 30.0, cap: float = 300.0) -> float:
    """Exponential backoff: base·2^(attempts-1), at most `cap` seconds."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


# what a partner's receipt can say (RFC 3798 dispositions as core.mdn reads and writes them): OK, WARNING, ERROR, FAILED
RECEIPT_OUTCOMES = ("displayed", "displayed/warning", "deleted/error", "deleted")


def settle_receipt(current: str | None, new: str) -> tuple[str, bool]:
    """A mail's receipt after `new` arrives, and whether `new` contradicts what the partner said before.

    A final answer stands: a replayed receipt changes nothing, a different later one is a contradiction (a
    replayed receipt must never turn "failed at partner" into "confirmed", nor the reverse). Only "held at the
    partner, resend possible" (deleted/error) may still become something else.
    """
    if new not in RECEIPT_OUTCOMES:
        raise IllegalTransition(f"receipt {current} → {new}")
    if current is None or (current == "deleted/error" and new != current):
        return new, False
    return current, current != new
