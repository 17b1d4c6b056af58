"""The states of queued work (outbound and inbound mails), Postfix-style, and the moves allowed between them.

    incoming ──claim──▶ active ──done──▶ done
        │                 ├──transient failure──▶ deferred ──due──▶ active
        │                 ├──refused / rejected──▶ hold      (an operator releases or discards)
        │                 ├──unexpected error────▶ corrupt   (with its traceback)
        │                 └──crash (start-up)────▶ incoming  (or corrupt after MAX_CRASHES)
        └──operator────────────────────────────▶ hold

Pure: the spool (gateway/spool.py) applies these moves to directories.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

MAX_CRASHES = 3


class QueueState(StrEnum):
    """Where a queued item is; each state is a directory of the spool."""

    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"
    CORRUPT = "corrupt"
    DONE = "done"


class IllegalMove(RuntimeError):
    """A queue move that the table does not allow."""


MOVES: dict[QueueState, frozenset[QueueState]] = {
    QueueState.INCOMING: frozenset({QueueState.ACTIVE, QueueState.HOLD}),
    QueueState.ACTIVE: frozenset(
        {QueueState.DONE, QueueState.DEFERRED, QueueState.HOLD, QueueState.CORRUPT, QueueState.INCOMING}
    ),
    QueueState.DEFERRED: frozenset({QueueState.ACTIVE, QueueState.HOLD}),
    QueueState.HOLD: frozenset({QueueState.INCOMING, QueueState.DONE}),
    QueueState.CORRUPT: frozenset({QueueState.INCOMING, QueueState.DONE}),
    QueueState.DONE: frozenset(),
}


def check_move(old: QueueState, new: QueueState) -> None:
    """Raise `IllegalMove` unless old → new is in the table."""
    if new not in MOVES[old]:
        raise IllegalMove(f"queue item {old} → {new}")


def after_crash(meta: dict[str, Any]) -> tuple[QueueState, dict[str, Any]]:
    """Where an item found ACTIVE at start-up goes: back to INCOMING, or CORRUPT after MAX_CRASHES crashes."""
    crashes = int(meta.get("crashes", 0)) + 1
    meta = {**meta, "crashes": crashes}
    if crashes >= MAX_CRASHES:
        meta["reason"] = f"the gateway stopped {crashes} times while processing this item; set aside"
        return QueueState.CORRUPT, meta
    return QueueState.INCOMING, meta


def is_due(state: QueueState, meta: dict[str, Any], now: float) -> bool:
    """True for work that may be claimed now."""
    if state is QueueState.INCOMING:
        return True
    return state is QueueState.DEFERRED and float(meta.get("next_attempt", 0)) <= now
