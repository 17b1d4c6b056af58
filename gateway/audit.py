"""The audit trail: who sent what to whom, kept apart from the operational logs (IHE ATNA).

- **Local copy = durable queue.** Every event (`gateway.core.audit`) is appended to `E:/audit/<UTC day>.jsonl`
  (folder 0700, files 0600: the gateway's user only) and fdatasync'ed before `record` returns. Each line holds
  the message and a SHA-256 over the previous line's hash and its own content, so a changed, removed or inserted
  record breaks the chain (`verify`, the `audit verify` command). A day's first record links to the previous
  day's last.
- **Repository.** `AuditForwarder` sends the records in order to the Audit Record Repository as RFC 5424
  messages over TLS (RFC 5425, client certificate: IHE ITI-20) and keeps how far it got in `E:/audit/sent.json`.
  While the repository is away the records wait in the day files (nothing is lost); RFC 5425 has no
  acknowledgement, so after a lost connection the records of its last seconds are sent again, marked
  `resent="1"` (a repository may see such a record twice, never zero times).
- **Crash story.** An event is written when the gateway records the state change it is about (indexing, a
  transfer sent or received, a forward), so a crash between the two loses nothing that was acknowledged: the
  intake journal, the queues and the catalog make the gateway do that step again at start-up, and the event is
  written again then; events written while journals are replayed at start-up carry `replay` so a reader can tell
  a possible duplicate. Events with a key already in today's or yesterday's file are not written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.core.audit import AuditEvent, syslog_frame, to_xml
from gateway.storage import write_durable

log = logging.getLogger(__name__)

GENESIS = "0" * 64
RESEND_SECONDS = 10.0  # after a lost connection, what was sent this long before it goes again (marked)


def _day(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d")


def _digest(prev: str, body: dict[str, object]) -> str:
    return hashlib.sha256(
        (prev + "\n" + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()
    ).hexdigest()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """One of the trail's side files (a cursor, the configuration last seen): atomically and durably
    (`storage.write_durable`), for the gateway's user only."""
    write_durable(path, [json.dumps(data, indent=1, sort_keys=True).encode()], path.parent)
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class Record:
    """One line of a day file."""

    seq: int
    at: float
    key: str
    xml: str
    prev: str
    hash: str
    replay: bool = False

    def body(self) -> dict[str, object]:
        return {"seq": self.seq, "at": self.at, "key": self.key, "xml": self.xml, "replay": self.replay}


def parse_record(line: str) -> Record:
    d = json.loads(line)
    return Record(
        int(d["seq"]),
        float(d["at"]),
        str(d["key"]),
        str(d["xml"]),
        str(d["prev"]),
        str(d["hash"]),
        bool(d.get("replay")),
    )


class AuditTrail:
    """Appends events to the hash-chained day files (thread-safe; one flush per `record` call)."""

    def __init__(self, folder: Path, source: str) -> None:
        self.folder = folder
        self.source = source
        self._lock = threading.Lock()
        self.replaying = False
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        self._last: tuple[int, str] | None = None  # (seq, hash) of the last record written
        self._keys: set[str] = set()
        self._keys_day = ""
        self._size: dict[str, int] = {}  # the day file's size after our last write
        self._after: tuple[str, int, int] = (
            "",
            -1,
            0,
        )  # (day, line, byte offset) after the last pending record

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """One writer at a time across processes (the gateway and an operator's command): the chain has one end."""
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def days(self) -> list[str]:
        """The days with a file, oldest first."""
        return sorted(p.stem for p in self.folder.glob("????-??-??.jsonl"))

    def records(self, day: str) -> Iterator[Record]:
        path = self.folder / f"{day}.jsonl"
        if not path.exists():
            return
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield parse_record(line)

    def _tail(self) -> tuple[int, str]:
        if self._last is None:
            days = self.days()
            last = None
            for day in reversed(days):
                for r in self.records(day):
                    last = r
                if last is not None:
                    break
            self._last = (last.seq, last.hash) if last else (0, GENESIS)
        return self._last

    def _known(self, day: str) -> set[str]:
        if self._keys_day != day:
            previous = (dt.date.fromisoformat(day) - dt.timedelta(days=1)).isoformat()
            self._keys = {r.key for d in (previous, day) for r in self.records(d)}
            self._keys_day = day
        return self._keys

    def recorded(self, keys: Iterable[str]) -> set[str]:
        """Those of the keys that an event in today's or yesterday's file has."""
        with self._lock, self._file_lock():
            day = _day(time.time())
            self._refresh(day)
            return set(keys) & self._known(day)

    def _refresh(self, day: str) -> None:
        """Forget what we know of the chain's end if another process (a CLI command: an operator's release or
        discard) wrote since our last write (the day file's size tells)."""
        path = self.folder / f"{day}.jsonl"
        size = path.stat().st_size if path.exists() else 0
        if size != self._size.get(day, size if self._last is None else -1):
            self._last, self._keys_day = None, ""

    def record(self, events: Iterable[AuditEvent]) -> int:
        """Append the events durably; return how many were new (a key seen today or yesterday is skipped)."""
        events = list(events)
        if not events:
            return 0
        with self._lock, self._file_lock():
            day = _day(time.time())
            path = self.folder / f"{day}.jsonl"
            self._refresh(day)
            seq, prev = self._tail()
            known = self._known(day)
            lines = []
            for e in events:
                if e.key in known:
                    continue
                seq += 1
                rec = Record(seq, e.at, e.key, to_xml(e), prev, "", self.replaying)
                rec = Record(rec.seq, rec.at, rec.key, rec.xml, prev, _digest(prev, rec.body()), rec.replay)
                prev = rec.hash
                known.add(e.key)
                lines.append(
                    json.dumps({**rec.body(), "prev": rec.prev, "hash": rec.hash}, separators=(",", ":"))
                    + "\n"
                )
            if not lines:
                return 0
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, "".join(lines).encode())
                os.fdatasync(fd)  # the event is on E: before the step it records goes on
                self._size = {day: os.fstat(fd).st_size}
            finally:
                os.close(fd)
            self._last = (seq, prev)
            return len(lines)

    def verify(self, day: str) -> tuple[bool, str]:
        """Check a day's chain (and its link to the day before); the first broken link, in words."""
        days = self.days()
        if day not in days:
            return False, f"no audit file for {day}"
        before = [d for d in days if d < day]
        prev = GENESIS
        if before:
            last = None
            for r in self.records(before[-1]):
                last = r
            prev = last.hash if last else GENESIS
        expected_seq = None
        path = self.folder / f"{day}.jsonl"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                r = parse_record(line)
            except (ValueError, KeyError, TypeError):
                return False, f"{day} line {n}: not a record"
            if r.prev != prev:
                return (
                    False,
                    f"{day} line {n} (seq {r.seq}): does not follow the record before it (removed or inserted)",
                )
            if _digest(r.prev, r.body()) != r.hash:
                return False, f"{day} line {n} (seq {r.seq}): its content does not match its hash (changed)"
            if expected_seq is not None and r.seq != expected_seq:
                return False, f"{day} line {n}: sequence {r.seq} after {expected_seq - 1}"
            prev, expected_seq = r.hash, r.seq + 1
        return True, f"{day}: chain intact"

    def pending(self, cursor: tuple[str, int]) -> Iterator[tuple[tuple[str, int], Record]]:
        """Records after `cursor` ((day, lines of that day already sent)), in order, each with the cursor after it."""
        day0, n0 = cursor
        for day in self.days():
            if day < day0:
                continue
            with (self.folder / f"{day}.jsonl").open("rb") as f:
                n, pos = 0, 0
                if day == day0 and self._after[:2] == (day, n0):
                    n, pos = n0, self._after[2]  # where the last batch ended: no need to read the day again
                    f.seek(pos)
                for raw in f:
                    pos += len(raw)
                    if not raw.strip():
                        continue
                    if not raw.endswith(b"\n"):
                        return  # a record being appended right now: the next round
                    n += 1
                    if day == day0 and n <= n0:
                        continue
                    self._after = (day, n, pos)
                    yield (day, n), parse_record(raw.decode("utf-8"))


@dataclass
class Repository:
    """Where the records go: host, port and the TLS client context (client certificate, the repository's CA)."""

    host: str
    port: int
    context: ssl.SSLContext


class AuditForwarder:
    """Sends the trail's records to the repository in order, durably remembering how far it got."""

    def __init__(self, trail: AuditTrail, repository: Repository, app: str = "dicom-mail-gateway") -> None:
        self.trail = trail
        self.repository = repository
        self.app = app
        self.host = socket.gethostname()
        self.cursor_file = trail.folder / "sent.json"
        self.sent = 0
        self.connected = False
        self._recent: list[
            tuple[float, tuple[str, int], tuple[str, int]]
        ] = []  # (when, cursor before, after)

    def cursor(self) -> tuple[str, int]:
        return self._read()[0]

    def _read(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """(how far the repository surely has the records, how far they may have gone out)."""
        try:
            d = json.loads(self.cursor_file.read_text())
            done = str(d["day"]), int(d["line"])
            return done, (str(d.get("out_day", done[0])), int(d.get("out_line", done[1])))
        except (OSError, ValueError, KeyError):
            return ("", 0), ("", 0)

    def _save(self, cursor: tuple[str, int], going: tuple[str, int] | None = None) -> None:
        """Remember how far the records went; `going`: how far the batch now being written may get (a gateway
        killed while writing it sends those again, marked, after its restart)."""
        out = going or cursor
        write_json(
            self.cursor_file, {"day": cursor[0], "line": cursor[1], "out_day": out[0], "out_line": out[1]}
        )

    async def drained(self, timeout: float) -> bool:
        """At shutdown: wait (at most `timeout`) until the repository has every record written so far; False if it
        has not (it gets them after the next start: they wait on E:)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if next(self.trail.pending(self.cursor()), None) is None:
                return True
            if not self.connected:
                break  # the repository is away: waiting would only delay the stop
            await asyncio.sleep(0.1)
        return False

    async def run_forever(self, wake: asyncio.Event, interval: float = 1.0) -> None:
        """Connect, send what is pending, wait for more; reconnect with backoff; never dies.

        Size: one connection's whole life (connect, send in order, notice the repository leave, mark what may
        need sending again) in one place, so the at-least-once reasoning can be read in one go."""
        delay = 1.0
        resend_from: tuple[str, int] | None = None
        resend_until = self._read()[1]  # what a killed predecessor may have written already
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        self.repository.host,
                        self.repository.port,
                        ssl=self.repository.context,
                        server_hostname=self.repository.host,
                    ),
                    15,
                )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                log.warning(
                    "audit repository %s:%d unreachable (%s); records wait on E:",
                    self.repository.host,
                    self.repository.port,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)
                continue
            delay, self.connected = 1.0, True
            closed = asyncio.ensure_future(reader.read())  # the repository never writes: EOF = it went away
            try:
                if resend_from is not None:
                    self._save(resend_from, resend_until)
                while not closed.done():
                    cursor = self.cursor()
                    batch = list(self.trail.pending(cursor))
                    if batch:
                        self._save(cursor, max(batch[-1][0], resend_until))
                    for n, (after, rec) in enumerate(batch):
                        again = after <= resend_until  # may be there already: marked
                        writer.write(
                            syslog_frame(
                                rec.xml, rec.at, self.host, self.app, rec.seq, resent=again, replay=rec.replay
                            )
                        )
                        if n % 100 == 99:
                            await writer.drain()
                    if batch:
                        await writer.drain()
                        if closed.done():
                            break
                        self._recent.append((time.monotonic(), cursor, batch[-1][0]))
                        self._save(batch[-1][0], max(batch[-1][0], resend_until))
                        self.sent += len(batch)
                    self._recent = [r for r in self._recent if time.monotonic() - r[0] < RESEND_SECONDS]
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(wake.wait()), interval)
                    wake.clear()
            except (OSError, ssl.SSLError) as exc:
                log.warning("audit repository connection lost (%s)", exc)
            finally:
                self.connected = False
                closed.cancel()
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            # what went out in the last seconds may not have arrived: it goes again, marked
            resend_from = self._recent[0][1] if self._recent else None
            resend_until = max(self._read()[1], self.cursor())
            self._recent = []
            log.warning("audit repository went away; reconnecting")
            await asyncio.sleep(delay)
