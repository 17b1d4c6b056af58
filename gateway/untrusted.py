"""The quota for unauthenticated content on D: (see `core.quota` for the rule): what is counted, and the drop.

Counted: held inbox items whose refusal came before the partner's signature was verified (`authenticated` false
in their meta.json) and that still have their bytes, and every fragment group not yet dropped. Mails from a
partner whose signature was verified are never counted and never dropped: they are kept until an operator acts.
A drop removes the bytes and keeps the metadata with the reason; it is logged and shows in check_mk.
Drops and operator actions on held items take one lock (`D:/state/hold.lock`), so that an operator never
releases a mail whose bytes are going at the same moment.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from gateway.core.queue import QueueState
from gateway.core.quota import Holding, plan_drops
from gateway.fragments import FragmentStore
from gateway.spool import CONTENT, Spool

log = logging.getLogger(__name__)


@contextlib.contextmanager
def hold_lock(state_dir: Path) -> Iterator[None]:
    """The lock for changes to held items (quota drops, operator release and discard), across processes."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "hold.lock").open("a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def holdings(inbox: Spool, fragments: FragmentStore) -> list[Holding]:
    """Every piece of unauthenticated content that still occupies D:."""
    out = []
    for item in inbox.items(QueueState.HOLD) + inbox.items(QueueState.CORRUPT):
        if item.meta.get("authenticated", True) or item.meta.get("content_dropped"):
            continue  # authenticated (or from before this rule: kept), or already dropped
        try:
            size = (item.path / CONTENT).stat().st_size
        except OSError:
            continue
        out.append(
            Holding(
                "mail",
                item.id,
                str(item.meta.get("sender", "")),
                size,
                float(item.meta.get("state_since", item.meta.get("created", 0))),
            )
        )
    for g in fragments.groups():
        if not g.dropped:
            out.append(Holding("fragments", g.key, g.sender, g.bytes, g.first_seen))
    return out


def enforce(
    inbox: Spool, fragments: FragmentStore, state_dir: Path, total: int, per_sender: int
) -> list[Holding]:
    """Drop the oldest unauthenticated content above the quotas; return what was dropped."""
    with hold_lock(state_dir):
        drops = plan_drops(holdings(inbox, fragments), total, per_sender)
        now = time.time()
        for h in drops:
            reason = f"unauthenticated content over its quota ({total} bytes in all, {per_sender} per sender)"
            if h.kind == "mail":
                item = inbox.find(h.ref)
                if item is not None and item.state in (QueueState.HOLD, QueueState.CORRUPT):
                    inbox.drop_content(item, reason, now)
            else:
                fragments.drop(h.ref, reason, now)
            log.warning(
                "quota: dropped the bytes of %s %s (%d bytes, unauthenticated); its record stays",
                "held mail" if h.kind == "mail" else "fragment group",
                h.ref,
                h.size,
            )
        return drops
