"""Failing over between mail nodes, for SMTP, POP3S and IMAPS alike: the first node that works serves.

The order and the cool-down of failed nodes come from `gateway.core.nodepool`; this records each attempt in it.
A node's answer can also be final (`classify` returns a `RejectedError`: an SMTP node refusing a message for good
works, and another node would refuse it too): then no other node is tried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.config import Node
from gateway.core.nodepool import NodePool
from gateway.errors import MailNodeError, RejectedError, TransientError

log = logging.getLogger(__name__)

C = TypeVar("C")


async def first_working(
    pool: NodePool[Node],
    protocol: str,
    connect: Callable[[Node], Awaitable[C]],
    errors: tuple[type[BaseException], ...],
    classify: Callable[[Node, BaseException], MailNodeError | RejectedError] | None = None,
) -> tuple[Node, C]:
    """The first node (in the pool's order) whose `connect` succeeds, and what it returned; a node that raises
    one of `errors` is marked failed and the next is tried, unless `classify` calls the error final (raised at
    once, the node counted as working). Raises TransientError when every node failed."""
    problems = []
    for node in pool.order(time.time()):
        try:
            conn = await connect(node)
        except errors as exc:
            err = classify(node, exc) if classify is not None else None
            if isinstance(err, RejectedError):
                pool.ok(node, time.time())  # the node works; it refuses this request
                raise err from None
            problem = err.problem if err is not None else f"{type(exc).__name__}: {exc}"
            pool.failed(node, time.time(), problem)
            log.warning("%s node %s failed: %s", protocol, node, problem)
            problems.append(str(MailNodeError(str(node), problem)))
            continue
        pool.ok(node, time.time())
        return node, conn
    raise TransientError(f"all {protocol} nodes failed: " + " | ".join(problems))
