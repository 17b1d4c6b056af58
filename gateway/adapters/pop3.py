"""The POP3S edge: implicit TLS on 995 with the client certificate, login by `AUTH EXTERNAL`.

Blocking `poplib` wrapped for asyncio: every call runs in a worker thread (`asyncio.to_thread`). A session is
used in three steps so the caller can make each mail durable before it is deleted:
`open()` → `list()` / `retr(n)` … → `delete(n)` … → `close()` (QUIT commits the deletions; without QUIT the
server keeps every mail, which is the safe outcome of a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import poplib
import ssl
from typing import BinaryIO, cast

from gateway.adapters import mailbox
from gateway.adapters.failover import first_working
from gateway.config import MailSettings, Node
from gateway.core.nodepool import NodePool

poplib._MAXLINE = 64 * 1024  # type: ignore[attr-defined]  # long header lines from other mailers


_READ_AHEAD = 1 << 16  # more than poplib's reader buffers (8 KiB), so reads go straight into our buffer
# one read of a mail: below glibc's mmap threshold (see service.tune_malloc), above a TLS record
_PIECE = 256 << 10
MAX_RETR_BYTES = 1 << 30  # no mail of ours comes near; a server that never ends its answer is cut off here


class MailError(mailbox.MailError):
    """The server refused this one mail (-ERR); the session is still in step and the next mail can be read."""


class MailTooLarge(Exception):
    """The mail grew past the caller's limit while being read (LIST said less): the session must be dropped."""


class DotLines:
    """The multi-line answer of RETR, fed in pieces as they arrive, written out without the dot-stuffing (a line
    that starts with "." came with one more, RFC 1939 §3) and without its terminating ".": only complete lines
    are written, the unfinished end of a piece waits for the next one."""

    def __init__(self, out: BinaryIO, limit: int) -> None:
        self.out, self.limit = out, limit
        self.rest = b""  # the unfinished line at the end of what came so far (starts a line)
        self.written = 0

    def feed(self, piece: bytes | memoryview) -> bool:
        """Take the next piece; True once the terminating line has come."""
        data = self.rest + piece if self.rest else bytes(piece)
        last = data.rfind(b"\r\n")
        cut = last + 2 if last >= 0 else 0
        lines, self.rest = data[:cut], data[cut:]
        if len(self.rest) + self.written > self.limit:
            raise MailTooLarge(f"mail is larger than {self.limit} bytes")
        if lines.startswith(b".\r\n"):
            return True
        end = lines.find(b"\r\n.\r\n")
        done = end >= 0
        if done:
            lines = lines[: end + 2]  # the last line of the mail keeps its CRLF
        if lines.startswith(b".."):
            lines = lines[1:]
        if b"\r\n.." in lines:
            lines = lines.replace(b"\r\n..", b"\r\n.")
        self.written += len(lines)
        if self.written > self.limit:
            raise MailTooLarge(f"mail is larger than {self.limit} bytes")
        self.out.write(lines)
        return done


class Pop3Session:
    """One logged-in POP3S session on one node."""

    def __init__(self, node: Node, conn: poplib.POP3_SSL) -> None:
        self.node = node
        self.conn = conn

    async def list(self) -> list[tuple[int, str, int]]:
        """(number, uidl, size) of every mail in the mailbox."""

        def _list() -> list[tuple[int, str, int]]:
            _, uidls, _ = self.conn.uidl()
            _, sizes, _ = self.conn.list()
            size_of = {int(line.split()[0]): int(line.split()[1]) for line in sizes}
            out = []
            for line in uidls:
                num, uid = line.decode().split(maxsplit=1)
                out.append((int(num), uid, size_of.get(int(num), 0)))
            return out

        return await asyncio.to_thread(_list)

    async def retr(self, number: int, size_hint: int = 0, limit: int = MAX_RETR_BYTES) -> bytearray:
        """The whole mail in memory, with CRLF line ends as on the wire (`retr_to` into a buffer; `size_hint`, the
        size from LIST, is not needed). Never more than `limit` bytes are read (`MailTooLarge`); -ERR for this
        mail is `MailError`."""
        out = io.BytesIO()
        await self.retr_to(number, out, limit)
        return bytearray(out.getbuffer())

    async def retr_to(self, number: int, out: BinaryIO, limit: int = MAX_RETR_BYTES) -> int:
        """Stream one mail into `out` (a file, for the fetch stage: the mail is never whole in memory), CRLF line
        ends as on the wire, dot-stuffing undone (RFC 1939 §3); how many bytes were written. Never more than
        `limit` bytes are read (`MailTooLarge`); -ERR for this mail is `MailError`."""
        return await asyncio.to_thread(self._retr_to, number, out, limit)

    def _retr_to(self, number: int, out: BinaryIO, limit: int) -> int:
        # poplib's retr() reads and keeps the mail line by line (a Python loop and an object per 76 bytes:
        # seconds and ~4x the mail in memory for 20 MB). Read the response in pieces of _PIECE instead, on
        # poplib's own connection, one TLS read per call into one reused buffer (below glibc's mmap threshold:
        # no mmap/munmap per piece, which once held the interpreter lock for seconds per study), and write out
        # the complete lines of each piece.
        conn = self.conn
        conn.sock.sendall(f"RETR {number}\r\n".encode())
        reader = cast(io.BufferedReader, conn.file)
        status = reader.readline(2048)
        if not status.startswith(b"-ERR") and not status.startswith(b"+OK"):
            raise poplib.error_proto(status.decode("ascii", "replace").strip()[:200] or "no answer to RETR")
        if status.startswith(b"-ERR"):
            raise MailError(status.decode("ascii", "replace").strip()[:200])
        lines = DotLines(out, limit)
        # what readline buffered beyond the status line: read1 returns only that, and empties the buffer; after
        # it, a buffer larger than the reader's own makes readinto1 read past it (with data in its buffer,
        # readinto1 would copy that and then block on one more read)
        if lines.feed(reader.read1(_READ_AHEAD)):
            return lines.written
        buf = bytearray(_PIECE)
        view = memoryview(buf)
        try:
            while True:
                n = reader.readinto1(view)
                if not n:
                    raise poplib.error_proto("connection closed in the middle of RETR")
                if lines.feed(view[:n]):
                    return lines.written
        finally:
            view.release()

    async def headers(self, number: int) -> bytes:
        """The mail's header section only (`TOP n 0`), at most 256 KiB: what is kept of a mail too large to fetch."""

        def _top() -> bytes:
            try:
                _, lines, _ = self.conn.top(number, 0)
            except poplib.error_proto as exc:
                raise MailError(str(exc)[:200]) from None
            out, size = [], 0
            for line in lines:
                size += len(line) + 2
                if size > 256 * 1024:
                    break
                out.append(line[1:] if line.startswith(b"..") else line)
            return b"\r\n".join(out) + b"\r\n\r\n"

        return await asyncio.to_thread(_top)

    async def delete(self, number: int) -> None:
        """Mark a mail deleted (takes effect at `close`)."""
        await asyncio.to_thread(self.conn.dele, number)

    async def close(self) -> None:
        """QUIT: commits deletions."""
        await asyncio.to_thread(self.conn.quit)

    def abort(self) -> None:
        """Drop the connection without QUIT: nothing is deleted."""
        with contextlib.suppress(OSError):
            self.conn.close()


class Pop3Cluster:
    """Opens sessions on a round-robin pool of POP3S nodes."""

    def __init__(self, mail: MailSettings, tls: ssl.SSLContext) -> None:
        self.mail = mail
        self.tls = tls
        self.pool: NodePool[Node] = NodePool(mail.pop3_nodes, mail.node_cooldown)

    def _connect(self, node: Node) -> poplib.POP3_SSL:
        conn = poplib.POP3_SSL(node.host, node.port, context=self.tls, timeout=self.mail.connect_timeout)
        try:
            if conn.sock is not None:
                conn.sock.settimeout(self.mail.io_timeout)
            resp = conn._shortcmd("AUTH EXTERNAL =")  # type: ignore[attr-defined]
            if not resp.startswith(b"+OK"):
                raise poplib.error_proto(resp)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> Pop3Session:
        """A logged-in session on the first node that works."""
        node, conn = await first_working(
            self.pool,
            "POP3",
            lambda n: asyncio.to_thread(self._connect, n),
            (OSError, ssl.SSLError, poplib.error_proto, EOFError),
        )
        return Pop3Session(node, conn)
