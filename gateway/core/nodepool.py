"""Round-robin over mail nodes with health: a node that failed is skipped for a cool-down, then tried again.

Pure: the clock is passed in. Each call to `order` starts one node further (round-robin), healthy nodes
first, nodes in cool-down last (still tried when nothing else is left, so a cluster-wide outage recovers
as soon as any node does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

N = TypeVar("N")


@dataclass
class NodeHealth:
    """What is known about one node."""

    last_ok: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    down_until: float = 0.0
    successes: int = 0
    failures: int = 0


@dataclass
class NodePool(Generic[N]):
    """Round-robin order with cool-down for failed nodes."""

    nodes: tuple[N, ...]
    cooldown: float = 60.0
    _next: int = 0
    health: dict[N, NodeHealth] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a node pool needs at least one node")
        for n in self.nodes:
            self.health.setdefault(n, NodeHealth())

    def order(self, now: float) -> list[N]:
        """The nodes to try, in order, for one request."""
        k = self._next % len(self.nodes)
        self._next += 1
        rotated = list(self.nodes[k:] + self.nodes[:k])
        healthy = [n for n in rotated if self.health[n].down_until <= now]
        resting = [n for n in rotated if self.health[n].down_until > now]
        return healthy + resting

    def ok(self, node: N, now: float) -> None:
        """Record a success."""
        h = self.health[node]
        h.last_ok = now
        h.down_until = 0.0
        h.successes += 1

    def to_probe(self, now: float) -> list[N]:
        """Nodes whose last word was a failure and whose cool-down is over: an idle node is judged by a probe,
        not left failing until traffic happens to pass it."""
        return [
            n
            for n in self.nodes
            if (h := self.health[n]).last_error_at is not None
            and (h.last_ok is None or h.last_error_at > h.last_ok)
            and h.down_until <= now
        ]

    def failed(self, node: N, now: float, error: str) -> None:
        """Record a failure; the node rests for `cooldown` seconds."""
        h = self.health[node]
        h.last_error = error
        h.last_error_at = now
        h.down_until = now + self.cooldown
        h.failures += 1
