"""Opening a mailbox session on the first mail node that answers (POP3S and IMAPS alike).

The order and the cool-down of failed nodes come from `gateway.core.nodepool`; this records each attempt in it.
SMTP has its own loop: a node that refuses a message works, and the refusal is final.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.config import Node
from gateway.core.nodepool import NodePool
from gateway.errors import MailNodeError, TransientError

log = logging.getLogger(__name__)

C = TypeVar("C")


async def first_working(
    pool: NodePool[Node],
    protocol: str,
    connect: Callable[[Node], Awaitable[C]],
    errors: tuple[type[BaseException], ...],
) -> tuple[Node, C]:
    """The first node (in the pool's order) whose `connect` succeeds, and what it returned; a node that raises
    one of `errors` is marked failed and the next is tried. Raises TransientError when every node failed."""
    problems = []
    for node in pool.order(time.time()):
        try:
            conn = await connect(node)
        except errors as exc:
            problem = f"{type(exc).__name__}: {exc}"
            pool.failed(node, time.time(), problem)
            log.warning("%s node %s failed: %s", protocol, node, problem)
            problems.append(str(MailNodeError(str(node), problem)))
            continue
        pool.ok(node, time.time())
        return node, conn
    raise TransientError(f"all {protocol} nodes failed: " + " | ".join(problems))
