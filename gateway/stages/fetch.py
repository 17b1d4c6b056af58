r"""Stage 5, fetch: poll the mailbox over POP3S (or IMAPS); each mail is durable in the inbox queue before it is
deleted on the server (`DELE`, or `\Deleted` + EXPUNGE).

The inbox item is named by the SHA-256 of the mail, so fetching the same mail twice (a crash between the
durable write and QUIT) lands on the same item and the same catalog row. A mail is streamed from the server into
a file below D:/tmp, hashed on the way, then fsynced and moved into the inbox: it is never whole in the gateway's
memory (IMAP's library hands over each literal whole, which is then written the same way).

The mailbox is shared and untrusted, so one mail affects only itself:
- a mail larger than `Settings.fetch_cap` is never read: its headers are kept as a held item (unauthenticated,
  "too large") and it is deleted from the server, so that it cannot fill the mailbox either;
- a mail the server will not give us (-ERR, NO) is skipped and the poll goes on; one that breaks the session is
  remembered (`D:/state/fetch-failures.json`, by UIDL), tried last in the next polls, and after `MAX_TRIES`
  left on the server and reported (check_mk, status) instead of blocking the mailbox;
- a mail that does not fit D:'s reserve right now waits on the server while smaller ones are fetched;
- fetched mails not yet checked may occupy at most `mail.max_inbox_backlog` bytes: above that, fetching waits for
  ingest (a flood fills the server, not D:).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

from gateway.adapters import mailbox
from gateway.adapters.mailbox import Mailbox
from gateway.core import inbound
from gateway.core.queue import QueueState
from gateway.core.states import MailState
from gateway.errors import TransientError
from gateway.stages.context import Stage, StageContext
from gateway.storage import Writeback, write_all

log = logging.getLogger(__name__)

MAX_MAILS_PER_POLL = 200
MAX_TRIES = 3  # a mail that broke the session this often stays on the server, reported
_MAIL_ERRORS = (mailbox.MailError,)


class _Digesting:
    """A file that hashes what is written to it (the fetch stage's content key, computed on the way in)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f  # unbuffered: what is written is in the page cache, where the kernel can start writing it
        self.digest = hashlib.sha256()
        self.written = Writeback(f.fileno())  # the fsync that makes the mail durable waits less

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        write_all(self.f, data)
        self.written.wrote(len(data))
        return len(data)


class FetchFailures:
    """Mails that broke a fetch, by UIDL (durable: a restart does not forget a poison mail)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.seen: dict[str, dict[str, Any]] = dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            self.seen = {}

    def _save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.seen, sort_keys=True))
        os.replace(tmp, self.path)

    def note(self, uid: str, problem: str, now: float) -> int:
        """Count one more failure of this mail; returns how many it has."""
        entry = self.seen.setdefault(uid, {"tries": 0, "first": now})
        entry.update(tries=int(entry["tries"]) + 1, last=now, problem=problem[:200])
        self._save()
        return int(entry["tries"])

    def given_up(self, uid: str) -> bool:
        return int(self.seen.get(uid, {}).get("tries", 0)) >= MAX_TRIES

    def order(self, listing: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
        """The mailbox listing with mails that failed before at the end (the others are fetched first), and
        entries of mails no longer on the server forgotten."""
        present = {uid for _, uid, _ in listing}
        if any(uid not in present for uid in self.seen):
            self.seen = {uid: e for uid, e in self.seen.items() if uid in present}
            self._save()
        return sorted(listing, key=lambda m: (m[1] in self.seen, m[0]))

    def stuck(self) -> int:
        """Mails left on the server after MAX_TRIES failures."""
        return sum(1 for e in self.seen.values() if int(e.get("tries", 0)) >= MAX_TRIES)


class Fetcher(Stage):
    """Moves mails from the mailbox into the inbox spool."""

    def __init__(self, ctx: StageContext, mailbox: Mailbox) -> None:
        super().__init__(ctx)
        self.mailbox = mailbox
        self.per_node: dict[str, int] = {}
        self.bytes_received = 0
        self.bytes_per_node: dict[str, int] = {}
        self.fetched = 0
        self.too_large = 0
        self.failures = FetchFailures(self.storage.state / "fetch-failures.json")

    async def _retr(self, session: Any, number: int, cap: int, tmp: Path) -> tuple[str, int]:
        """One mail streamed from the server into `tmp` (below D:/tmp), hashed on the way: never whole in the
        gateway's memory. Its content key and size."""
        f = await asyncio.to_thread(tmp.open, "wb", buffering=0)
        try:
            out = _Digesting(f)
            size = await session.retr_to(number, cast(BinaryIO, out), cap)
        finally:
            await asyncio.to_thread(f.close)
        return out.digest.hexdigest()[:40], size

    async def _keep(self, tmp: Path, key: str, length: int, node: str) -> None:
        """Make a fetched mail durable in the inbox and record it (while the session retrieves the next one)."""
        try:
            await asyncio.to_thread(self._put, tmp, key, length, node)
        finally:  # moved into the inbox, or a partial mail: nothing stays in tmp/
            tmp.unlink(missing_ok=True)
        # crash here: queued but not indexed; start-up reconciliation records it
        await self.catalog.record_in_mail(key, f"spool/inbox/{key}", length, time.time())
        self.per_node[node] = self.per_node.get(node, 0) + 1
        self.bytes_received += length
        self.bytes_per_node[node] = self.bytes_per_node.get(node, 0) + length
        self.wakes.ingest.set()

    @staticmethod
    async def _delete_when_kept(session: Any, keeping: tuple[int, asyncio.Task[None]] | None) -> int:
        """Wait until the mail before is durable and recorded, then delete it on the server: 1 (0: none)."""
        if keeping is None:
            return 0
        number, task = keeping
        await task
        # crash here: mail durable and recorded, still on the server; fetched again → same key, ignored
        await session.delete(number)
        return 1

    def _put(self, tmp: Path, key: str, size: int, node: str) -> None:
        """Make a fetched mail durable in the inbox under its content key (fsync, moved in; in a thread)."""
        self.inbox.put_file(key, tmp, {"node": node, "size": size})

    def _backlog(self) -> int:
        """Bytes of fetched mails not yet checked (incoming and deferred inbox items)."""
        return sum(
            int(i.meta.get("size", 0))
            for s in (QueueState.INCOMING, QueueState.DEFERRED)
            for i in self.inbox.items(s)
        )

    def _hold_headers(self, uid: str, head: bytes, size: int, node: str, cap: int) -> str:
        """Keep the headers of a mail too large to fetch as a held, unauthenticated item with the reason."""
        key = "large-" + hashlib.sha256(f"{uid}\0{size}".encode() + head).hexdigest()[:34]
        item = self.inbox.put(key, head, {"node": node, "size": size, "headers_only": True})
        if item.state is QueueState.INCOMING:
            item = self.inbox.move(item, QueueState.ACTIVE)
            item = self.inbox.move(
                item,
                QueueState.HOLD,
                reason=f"mail of {size} bytes is larger than the fetch limit of {cap} bytes; only its headers "
                "were kept and it was deleted from the server",
                public_reason=inbound.TOO_LARGE,
                authenticated=False,
            )
        return key

    async def _refuse_too_large(self, session: Any, number: int, uid: str, size: int, cap: int) -> None:
        try:
            head = await session.headers(number)
        except _MAIL_ERRORS:
            head = b"\r\n"
        node = str(session.node)
        key = await asyncio.to_thread(self._hold_headers, uid, head, size, node, cap)
        now = time.time()
        await self.catalog.record_in_mail(key, f"spool/inbox/{key}", size, now)
        if await self.catalog.mail_state(key) == MailState.FETCHED.value:
            await self.catalog.finish_in_mail(
                key, MailState.QUARANTINED, now, error="larger than the fetch limit"
            )
        # crash here: headers held and recorded, mail still on the server; the next poll finds the same item
        await session.delete(number)
        self.too_large += 1
        log.warning(
            "mail %s (%d bytes) is larger than the fetch limit (%d): headers held, mail deleted",
            key,
            size,
            cap,
        )

    async def poll_once(self) -> int:
        """One session: fetch, make durable, delete. Returns the number of mails taken.

        Size: one mailbox session; the crash points between fetch, record and delete are commented in the order they occur.
        """
        if not self.storage.has_room():
            # D: is full: mails stay on the server until there is room again
            log.warning("D: below its free-space reserve: mailbox not polled")
            return 0
        backlog = await asyncio.to_thread(self._backlog)
        if backlog > self.settings.mail.max_inbox_backlog:
            log.warning("%d bytes of fetched mail not yet checked: fetching waits for ingest", backlog)
            return 0
        cap = self.settings.fetch_cap
        session = await self.mailbox.open()
        taken = 0
        in_flight = ""
        keeping: tuple[int, asyncio.Task[None]] | None = None  # the mail being made durable, and its number
        try:
            listing = self.failures.order(await session.list())
            for number, uid, size in listing[:MAX_MAILS_PER_POLL]:
                if self.failures.given_up(uid):
                    continue  # reported (check_mk); stays on the server for the mail operator
                if size > cap:
                    await self._refuse_too_large(session, number, uid, size, cap)
                    continue
                if backlog > self.settings.mail.max_inbox_backlog:
                    break
                if self.storage.free_bytes() - 2 * size < self.storage.min_free:
                    log.warning(
                        "D: too full for mail %s (%d bytes) now: it stays on the server", number, size
                    )
                    continue  # smaller mails may still fit
                in_flight = uid
                tmp = self.storage.tmp / f".fetch.{os.getpid()}.{time.monotonic_ns()}.tmp"
                try:
                    key, length = await self._retr(session, number, cap, tmp)
                except _MAIL_ERRORS as exc:
                    tmp.unlink(missing_ok=True)
                    tries = self.failures.note(uid, str(exc), time.time())
                    log.warning(
                        "mail %s could not be fetched (try %d of %d): %s", number, tries, MAX_TRIES, exc
                    )
                    in_flight = ""
                    continue
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                in_flight = ""
                # the previous mail was made durable while this one came: delete it now (QUIT commits it)
                taken += await self._delete_when_kept(session, keeping)
                keeping = (number, asyncio.create_task(self._keep(tmp, key, length, str(session.node))))
                backlog += length
            taken += await self._delete_when_kept(session, keeping)
            keeping = None
            await session.close()  # QUIT commits the deletions
        except BaseException as exc:
            session.abort()
            if keeping is not None:  # durable and recorded, or not: either way it is still on the server
                with contextlib.suppress(BaseException):
                    await keeping[1]
            if in_flight and isinstance(exc, Exception):
                # this mail broke the session: it goes last next time, and is given up after MAX_TRIES
                self.failures.note(in_flight, f"{type(exc).__name__}", time.time())
            raise
        self.fetched += taken
        if taken:
            log.info("fetched %d mails via %s", taken, session.node)
        return taken

    async def run_forever(self) -> None:
        """Poll the mailbox for as long as the gateway runs (`next_poll_in` says when); never dies."""
        quiet = QUIET_START
        while True:
            interval = self.settings.mail.poll_interval
            try:
                taken = await self.poll_once()
                self.guard.ok()
            except TransientError as exc:  # every node failed: the next poll tries them again
                log.warning("mailbox poll failed: %s", exc)
                taken, quiet = 0, QUIET_START  # a failed poll is retried after the whole interval
            except Exception as exc:
                if self.guard.failed(exc) is None:
                    return
                taken, quiet = 0, QUIET_START
            quiet = 0 if taken else quiet + 1
            await asyncio.sleep(next_poll_in(taken, quiet, interval))


FAST_POLL = 0.25  # s: the first look again after the mailbox ran empty
QUIET_START = 64  # empty polls counted at start-up: no burst is under way, so `poll_interval` applies


def next_poll_in(taken: int, quiet: int, poll_interval: float) -> float:
    """Seconds until the next poll. A poll that took mails is followed at once (a study's further mails are
    arriving); after it ran empty, the mailbox is looked at again after 0.25 s, then twice as long after every
    empty poll, up to `poll_interval`: the rest of a study that is still being sent is fetched as it lands,
    and an idle mailbox costs one session per `poll_interval`. `quiet`: empty polls since the last that took
    mails."""
    if taken:
        return 0.0
    return min(poll_interval, FAST_POLL * 2 ** min(max(quiet - 1, 0), 30))
