r"""Stage 5, fetch: poll the mailbox over POP3S (or IMAPS); each mail is durable in the inbox queue before it is
deleted on the server (`DELE`, or `\Deleted` + EXPUNGE).

The inbox item is named by the SHA-256 of the mail, so fetching the same mail twice (a crash between the
durable write and QUIT) lands on the same item and the same catalog row.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from gateway.adapters.imap import ImapCluster
from gateway.adapters.pop3 import Pop3Cluster
from gateway.errors import TransientError
from gateway.stages.context import Stage, StageContext

log = logging.getLogger(__name__)

MAX_MAILS_PER_POLL = 200


class Fetcher(Stage):
    """Moves mails from the mailbox into the inbox spool."""

    def __init__(self, ctx: StageContext, mailbox: Pop3Cluster | ImapCluster) -> None:
        super().__init__(ctx)
        self.mailbox = mailbox
        self.per_node: dict[str, int] = {}
        self.bytes_received = 0
        self.fetched = 0

    def _put(self, raw: bytes | bytearray, node: str) -> str:
        """Make a fetched mail durable in the inbox under its content key (in a thread: it hashes the whole mail)."""
        key = hashlib.sha256(raw).hexdigest()[:40]
        self.inbox.put(key, raw, {"node": node, "size": len(raw)})
        return key

    async def poll_once(self) -> int:
        """One session: fetch, make durable, delete. Returns the number of mails taken."""
        if not self.storage.has_room():
            # D: is full: mails stay on the server until there is room again
            log.warning("D: below its free-space reserve: mailbox not polled")
            return 0
        session = await self.mailbox.open()
        taken = 0
        try:
            listing = await session.list()
            for number, _uid, size in listing[:MAX_MAILS_PER_POLL]:
                if self.storage.free_bytes() - 2 * size < self.storage.min_free:
                    log.warning(
                        "D: too full for the next mail (%d bytes): the rest stays on the server", size
                    )
                    break
                raw = await session.retr(number, size)
                key = await asyncio.to_thread(self._put, raw, str(session.node))
                # crash here: queued but not indexed; start-up reconciliation records it
                await self.catalog.record_in_mail(key, f"spool/inbox/{key}", len(raw), time.time())
                # crash here: mail durable and recorded, still on the server; fetched again → same key, ignored
                await session.delete(number)
                taken += 1
                self.per_node[str(session.node)] = self.per_node.get(str(session.node), 0) + 1
                self.bytes_received += len(raw)
                self.wakes.ingest.set()
            await session.close()  # QUIT commits the deletions
        except BaseException:
            session.abort()
            raise
        self.fetched += taken
        if taken:
            log.info("fetched %d mails via %s", taken, session.node)
        return taken

    async def run_forever(self) -> None:
        """Poll every `poll_interval` seconds (at once again while the mailbox had mails); never dies."""
        while True:
            taken = 0
            try:
                taken = await self.poll_once()
            except TransientError as exc:
                log.warning("mailbox poll failed: %s", exc)
            except Exception:
                log.exception("mailbox poll failed")
            if taken < MAX_MAILS_PER_POLL:
                await asyncio.sleep(self.settings.mail.poll_interval)
