"""The IMAPS edge (aioimaplib): implicit TLS on 993 with the client certificate; `AUTHENTICATE EXTERNAL`
(the certificate is the login) or, when `mail.imap_password_env` names a variable, LOGIN with that password.

The session offers the same three steps as POP3 (`adapters.pop3`), so the fetch stage works with either:
`list()` / `retr(n)` … → `delete(n)` (flag \\Deleted) … → `close()` (EXPUNGE, LOGOUT). A crash before `close`
leaves every mail on the server (at worst flagged), so nothing is lost; mails are fetched by UID with
`BODY.PEEK[]`, which leaves them unread for other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
from typing import BinaryIO

import aioimaplib

from gateway.adapters import mailbox
from gateway.adapters.failover import first_working
from gateway.config import MailSettings, Node
from gateway.core.nodepool import NodePool

_FETCH_SIZE = re.compile(rb"UID (\d+).*RFC822\.SIZE (\d+)|RFC822\.SIZE (\d+).*UID (\d+)")


class ImapError(Exception):
    """The server answered NO/BAD."""


class MailError(ImapError, mailbox.MailError):
    """The server refused this one mail; the session goes on with the next."""


def _ok(response: aioimaplib.Response, what: str) -> aioimaplib.Response:
    if response.result != "OK":
        text = b" ".join(x for x in response.lines if isinstance(x, bytes))[:200].decode("ascii", "replace")
        raise ImapError(f"{what}: {response.result} {text}")
    return response


class ImapSession:
    """One authenticated IMAPS session with the folder selected."""

    def __init__(self, node: Node, client: aioimaplib.IMAP4_SSL, timeout: float) -> None:
        self.node = node
        self.client = client
        self.timeout = timeout
        self.deleted = 0

    async def list(self) -> list[tuple[int, str, int]]:
        """(uid, uid as text, size) of every mail in the folder."""
        res = _ok(await self.client.uid_search("ALL"), "UID SEARCH")
        uids = [
            int(u) for line in res.lines[:1] if isinstance(line, bytes) for u in line.split() if u.isdigit()
        ]
        if not uids:
            return []
        res = _ok(await self.client.uid("fetch", "1:*", "(UID RFC822.SIZE)"), "UID FETCH sizes")
        sizes: dict[int, int] = {}
        for line in res.lines:
            if isinstance(line, bytes) and (m := _FETCH_SIZE.search(line)):
                uid, size = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
                sizes[int(uid)] = int(size)
        return [(uid, str(uid), sizes.get(uid, 0)) for uid in sorted(uids)]

    async def retr(self, uid: int, size_hint: int = 0, limit: int = 1 << 30) -> bytes:
        """The whole mail, as stored on the server (`size_hint` is for POP3's reader; IMAP gets a literal).
        The caller has checked RFC822.SIZE against `limit`; a literal larger than that is refused all the same."""
        res = await self.client.uid("fetch", str(uid), "BODY.PEEK[]")
        if res.result != "OK":
            raise MailError(f"UID FETCH {uid}: {res.result}")
        # aioimaplib returns: b'n FETCH (... BODY[] {size}', bytearray(literal), b')', b'Success'
        for line in res.lines:
            if isinstance(line, bytearray):
                if len(line) > limit:
                    raise MailError(f"UID FETCH {uid}: larger than {limit} bytes")
                return bytes(line)
        raise MailError(f"UID FETCH {uid}: no message literal in the answer")

    async def retr_to(self, uid: int, out: BinaryIO, limit: int = 1 << 30) -> int:
        """`retr` written into `out` (aioimaplib hands over the literal whole; the write runs in a thread)."""
        data = await self.retr(uid, 0, limit)
        await asyncio.to_thread(out.write, data)
        return len(data)

    async def headers(self, uid: int) -> bytes:
        """The mail's header section only: what is kept of a mail too large to fetch."""
        res = await self.client.uid("fetch", str(uid), "BODY.PEEK[HEADER]")
        for line in res.lines if res.result == "OK" else []:
            if isinstance(line, bytearray):
                return bytes(line[: 256 * 1024])
        raise MailError(f"UID FETCH {uid} headers: {res.result}")

    async def delete(self, uid: int) -> None:
        """Flag \\Deleted (removed at `close`)."""
        _ok(await self.client.uid("store", str(uid), "+FLAGS.SILENT (\\Deleted)"), "UID STORE")
        self.deleted += 1

    async def close(self) -> None:
        """EXPUNGE what was flagged, then LOGOUT."""
        if self.deleted:
            _ok(await self.client.expunge(), "EXPUNGE")
        with contextlib.suppress(Exception):
            await self.client.logout()

    def abort(self) -> None:
        """Drop the connection; nothing is expunged."""
        with contextlib.suppress(Exception):
            transport = getattr(self.client.protocol, "transport", None)
            if transport is not None:
                transport.close()


class ImapCluster:
    """Opens sessions on a round-robin pool of IMAPS nodes."""

    def __init__(self, mail: MailSettings, tls: ssl.SSLContext) -> None:
        self.mail = mail
        self.tls = tls
        self.pool: NodePool[Node] = NodePool(mail.imap_nodes, mail.node_cooldown)

    async def _connect(self, node: Node) -> aioimaplib.IMAP4_SSL:
        client = aioimaplib.IMAP4_SSL(
            node.host, node.port, timeout=self.mail.io_timeout, ssl_context=self.tls
        )
        try:
            await asyncio.wait_for(client.wait_hello_from_server(), self.mail.connect_timeout)
            password = os.environ.get(self.mail.imap_password_env, "") if self.mail.imap_password_env else ""
            if password:
                _ok(await client.login(self.mail.imap_user or self.mail.address, password), "LOGIN")
            else:
                proto = client.protocol
                command = aioimaplib.Command(
                    "AUTHENTICATE", proto.new_tag(), "EXTERNAL", "=", loop=proto.loop
                )
                _ok(
                    await asyncio.wait_for(proto.execute(command), self.mail.io_timeout),
                    "AUTHENTICATE EXTERNAL",
                )
                proto.state = aioimaplib.AUTH
            _ok(await client.select(self.mail.imap_folder), f"SELECT {self.mail.imap_folder}")
        except BaseException:
            with contextlib.suppress(Exception):
                transport = getattr(client.protocol, "transport", None)
                if transport is not None:
                    transport.close()
            raise
        return client

    async def open(self) -> ImapSession:
        """An authenticated session on the first node that works."""
        node, client = await first_working(
            self.pool,
            "IMAP",
            self._connect,
            (
                OSError,
                ssl.SSLError,
                ImapError,
                TimeoutError,
                aioimaplib.Abort,
                aioimaplib.CommandTimeout,
            ),
        )
        return ImapSession(node, client, self.mail.io_timeout)
