"""The mailbox, whatever protocol reads it: one interface for POP3S and IMAPS (the service picks one by
`mail.protocol`), so the fetch stage, status and metrics never know which one it is.

A session is used in three steps so the caller can make each mail durable before it is deleted:
`open()` → `list()` / `retr(n)` … → `delete(n)` … → `close()` (which commits the deletions; `abort()` drops the
connection and the server keeps every mail, the safe outcome of a crash).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from gateway.config import Node
    from gateway.core.nodepool import NodePool


class MailError(Exception):
    """The server refused this one mail; the session is still in step and the next mail can be read."""


class MailboxSession(Protocol):
    """One logged-in session on one node."""

    node: Node

    async def list(self) -> list[tuple[int, str, int]]:
        """(number, unique id, size) of every mail."""
        ...

    async def retr(self, number: int, size_hint: int = 0, limit: int = ...) -> bytes | bytearray:
        """The whole mail, CRLF line ends; never more than `limit` bytes are read."""
        ...

    async def retr_to(self, number: int, out: BinaryIO, limit: int = ...) -> int:
        """The mail written into `out` (CRLF line ends), as it arrives where the protocol allows; bytes written."""
        ...

    async def headers(self, number: int) -> bytes:
        """The header section only (bounded): what is kept of a mail too large to fetch."""
        ...

    async def delete(self, number: int) -> None: ...

    async def close(self) -> None: ...

    def abort(self) -> None: ...


class Mailbox(Protocol):
    """A round-robin pool of mailbox nodes; `open` fails over between them (`adapters.failover`)."""

    pool: NodePool[Node]

    async def open(self) -> MailboxSession: ...
