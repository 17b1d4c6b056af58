"""Stage 1, receive: make each C-STORE durable, then index it in the catalog.

Two halves in two kinds of process (see `gateway/stages/receivers.py`):

- `DurableIntake` runs in the DICOM receiver processes, in each association's thread: read the UIDs, move the file
  into `images/` durably, append one line to that process's intake journal and fdatasync it, and only then return,
  so the SCP answers success. Then it tells the main process (an event over a socket); it never waits for it.
- `Intake` runs on the main process's event loop: it indexes what the receivers report in batches in the catalog
  and tells each receiver how many of its journal lines are indexed, so the journal can be emptied.

The journals are the bridge across crashes: at start-up every journal line is indexed again (indexing is
idempotent) before any receiver starts, then the journals are deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.adapters.dicom import Received
from gateway.auditing import Auditor
from gateway.catalog import Catalog, InstanceRecord
from gateway.core.dicominfo import InstanceInfo, read_info
from gateway.stages import LoopGuard, record
from gateway.stages.context import Progress
from gateway.storage import Storage, StoreOutcome, fsync_dir

log = logging.getLogger(__name__)

JOURNAL_TRUNCATE_BYTES = 4 * 1024 * 1024


def record_to_json(r: InstanceRecord) -> str:
    """One journal line / receiver event for a stored instance."""
    i = r.info
    return json.dumps(
        {
            "sop": i.sop_instance_uid,
            "cls": i.sop_class_uid,
            "study": i.study_uid,
            "series": i.series_uid,
            "ts": i.transfer_syntax,
            "mod": i.modality,
            "num": i.series_number,
            "path": r.path,
            "size": r.size,
            "sha": r.sha256,
            "src": r.source,
            "origin": r.origin,
            "route": r.route,
            "at": r.received_at,
            "cae": r.called_ae,
            "peer": r.peer,
        },
        separators=(",", ":"),
    )


def record_from_json(line: str) -> InstanceRecord:
    """The inverse of `record_to_json` (raises ValueError/KeyError/TypeError on a damaged line)."""
    d = json.loads(line)
    info = InstanceInfo(d["cls"], d["sop"], d["study"], d["series"], d["ts"], d["mod"], d["num"])
    return InstanceRecord(
        info,
        d["path"],
        d["size"],
        d["sha"],
        d["src"],
        d["origin"],
        d["route"],
        d["at"],
        called_ae=d.get("cae"),  # journals written before routing rules have neither
        peer=d.get("peer"),
    )


class IntakeJournal:
    """Append-only, fdatasync'ed record of instances acknowledged to modalities but maybe not yet indexed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fsync_dir(path.parent)
        self.appended = 0
        self.indexed = 0

    def append(self, record: InstanceRecord, sync: bool = True) -> None:
        """Note one stored instance (called in an association thread); durably unless `sync` is false, when the
        caller `sync`s before it tells anyone (`GroupFlush`)."""
        line = (record_to_json(record) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            self.appended += 1
        if sync:
            self.sync()

    def sync(self) -> None:
        """Every line written so far is on disk when this returns."""
        os.fdatasync(self._fd)

    @staticmethod
    def replay(path: Path) -> list[InstanceRecord]:
        """Every record in a journal (a torn last line from a crash is skipped: it was never acknowledged)."""
        records = []
        for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(record_from_json(raw))
            except (ValueError, KeyError, TypeError):
                continue
        return records

    def mark_indexed(self, count: int) -> None:
        """Count records now committed to the catalog; empty the journal when everything is."""
        with self._lock:
            self.indexed += count
            if self.indexed == self.appended and os.fstat(self._fd).st_size > JOURNAL_TRUNCATE_BYTES:
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class GroupFlush:
    """Group commit for the receivers: what several association threads need flushed before they acknowledge
    (the directories their instances were linked into, and the journal lines they wrote) is flushed once for all
    of them. A thread that asks while a flush runs waits for the next one, which the first of the waiting threads
    runs for everyone waiting; nobody returns before a flush that started after its request has finished. So an
    acknowledgement still follows durability, and N associations pay for about one set of flushes per round
    instead of N (the instance's own file is fsynced by its thread before it asks: that flush carries the data).
    A failed flush raises in the thread that ran it and is run again by the next one (its directories stay
    asked for)."""

    def __init__(self, journal: IntakeJournal) -> None:
        self.journal = journal
        self._cond = threading.Condition()
        self._dirs: set[Path] = set()
        self._asked = 0  # requests so far (each one's number is its ticket)
        self._flushed = 0  # every ticket up to this one is flushed
        self._busy = False
        self.rounds = 0  # flushes run (the tests compare this with the requests)

    def flush(self, folder: Path) -> None:
        """Return once `folder`'s entries and the journal's lines written before this call are on disk."""
        with self._cond:
            self._dirs.add(folder)
            self._asked += 1
            ticket = self._asked
            while self._flushed < ticket:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                batch, upto = self._dirs, self._asked
                self._dirs = set()
                self._cond.release()
                try:
                    for d in sorted(batch):
                        fsync_dir(d)
                    self.journal.sync()
                except BaseException:
                    self._cond.acquire()
                    self._dirs |= batch  # asked for still: the next flush takes them
                    self._busy = False
                    self._cond.notify_all()
                    raise
                self._cond.acquire()
                self._busy = False
                self._flushed = max(self._flushed, upto)
                self.rounds += 1
                self._cond.notify_all()


class DurableIntake:
    """The durable half of receiving, in a receiver process: called in association threads."""

    def __init__(
        self,
        storage: Storage,
        routes: dict[str, str],
        journal: IntakeJournal,
        emit: Callable[[dict[str, Any]], None],
    ) -> None:
        self.storage = storage
        self.routes = routes  # Called AE Title → partner name
        self.journal = journal
        self.flusher = GroupFlush(journal)
        self.emit = emit

    def store(self, received: Received) -> None:
        """Make one received instance durable. Raises to refuse it (the SCP maps the error to a status)."""
        # Below the reserve the instance is refused with 0xA700 (out of resources); the modality retries later.
        self.storage.check_room()
        info = read_info(received.temp_path)
        digest = (received.sha256, received.size) if received.sha256 and received.size is not None else None
        result = self.storage.store_temp_file(received.temp_path, info, digest, sync_dir=False)
        # crash here: file durable, its name maybe not, not journaled; no success was sent, the modality resends
        if result.outcome is StoreOutcome.CONFLICT:
            log.warning(
                "instance %s: same UID, different content: kept aside in conflicts/", info.sop_instance_uid
            )
            self.emit({"t": "conflict"})
            return
        record = InstanceRecord(
            info=info,
            path=self.storage.relative(result.path),
            size=result.size,
            sha256=result.sha256,
            source="dicom",
            origin=received.calling_ae,
            route=self.routes.get(received.called_ae.strip()),
            received_at=time.time(),
            called_ae=received.called_ae.strip(),
            peer=received.peer,
        )
        self.journal.append(record, sync=False)
        # crash here: name and journal line maybe lost, nothing acknowledged: the modality resends
        # the name and the line, flushed with those of other associations
        self.flusher.flush(result.path.parent)
        # crash here: journaled and durable, success not yet sent; replay indexes it, the modality may resend (duplicate)
        self.emit({"t": "stored", "o": result.outcome.value, "r": record_to_json(record)})


class Intake:
    """The indexing half of receiving, on the main process's event loop."""

    def __init__(
        self,
        storage: Storage,
        catalog: Catalog,
        wake_router: asyncio.Event,
        progress: Progress | None = None,
        wake_index: asyncio.Event | None = None,
    ) -> None:
        self.guard = LoopGuard("index", progress)
        self.storage = storage
        self.catalog = catalog
        self.wake_router = wake_router
        self.wake_index = wake_index or asyncio.Event()  # the DICOMweb index reads new headers
        self.queue: asyncio.Queue[tuple[str, InstanceRecord]] = asyncio.Queue()
        # told after each committed batch: receiver key → how many of its records are now indexed
        self.on_indexed: Callable[[dict[str, int]], None] = lambda counts: None
        self.received = 0
        self.duplicates = 0
        self.conflicts = 0
        self._waiting: Counter[str] = Counter()  # study → its records acknowledged here, not yet indexed
        self.audit: Auditor | None = (
            None  # set by the service: "DICOM Instances Transferred" per sender and study
        )

    def journals(self) -> list[Path]:
        """Every intake journal on D: (one per receiver process that ran, and the single one of older versions)."""
        return sorted(self.storage.intake.glob("journal*.jsonl"))

    def reported(self, receiver: str, event: dict[str, Any]) -> None:
        """An event from a receiver process: a stored instance is queued for indexing, counters are kept."""
        if event.get("t") == "conflict":
            self.conflicts += 1
            return
        record = record_from_json(str(event["r"]))
        self.received += 1
        if event.get("o") == StoreOutcome.DUPLICATE.value:
            self.duplicates += 1
        self._waiting[record.info.study_uid] += 1
        self.queue.put_nowait((receiver, record))

    def waiting_studies(self) -> set[str]:
        """Studies with instances acknowledged here but not indexed yet: the router does not call them stable."""
        return set(self._waiting)

    def _indexed(self, records: list[InstanceRecord]) -> None:
        self._waiting.subtract(r.info.study_uid for r in records)
        for study in [s for s, n in self._waiting.items() if n <= 0]:
            del self._waiting[study]

    async def replay(self, journal: Path) -> int:
        """Index every record of a journal whose writer is gone, then delete it; return how many records."""
        records = await asyncio.to_thread(IntakeJournal.replay, journal)
        # a line whose file has no name on disk was never acknowledged: the line and the directory entry are
        # flushed together before the success goes out (`GroupFlush`), and a crash in between may keep either
        kept = await asyncio.to_thread(lambda: [r for r in records if (self.storage.root / r.path).exists()])
        if len(kept) < len(records):
            log.warning(
                "intake journal %s: %d records name files a crash took before they were acknowledged; skipped",
                journal.name,
                len(records) - len(kept),
            )
        records = kept
        if records:
            self._waiting.update(r.info.study_uid for r in records)
            try:
                # the catalog away, or on Galera another node indexing the same rows (1213): wait and index again
                new = await record("journal replay", lambda: self.catalog.record_instances(records))
            finally:
                self._indexed(records)  # or never will be by this call: nothing of them to route
            await self._audit(records, replay=True)
            log.info(
                "intake journal %s: %d records replayed, %d were not yet indexed",
                journal.name,
                len(records),
                new,
            )
        # crash before the unlink: the next start replays the same lines again (idempotent)
        journal.unlink(missing_ok=True)
        await asyncio.to_thread(fsync_dir, journal.parent)
        return len(records)

    async def recover(self) -> int:
        """Index what the journals hold from before a crash (before any receiver starts)."""
        total = 0
        for journal in self.journals():
            total += await self.replay(journal)
        return total

    async def index_forever(self) -> None:
        """Index received instances in batches; never dies (a failed batch is retried)."""
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < 500:
                batch.append(self.queue.get_nowait())
            while True:
                try:
                    await self.catalog.record_instances([record for _, record in batch])
                    self._indexed([record for _, record in batch])
                    # before the receivers may forget the journal lines: a crash here replays them (marked replay)
                    await self._audit([record for _, record in batch])
                    self.guard.ok()
                    break
                except Exception as exc:  # the batch is in the receivers' journals: nothing is lost meanwhile
                    if not await self.guard.pause(exc):
                        return
            counts: dict[str, int] = {}
            for receiver, _ in batch:
                counts[receiver] = counts.get(receiver, 0) + 1
            self.on_indexed(counts)
            self.wake_router.set()
            self.wake_index.set()

    async def _audit(self, records: list[InstanceRecord], replay: bool = False) -> None:
        if self.audit is None:
            return
        self.audit.trail.replaying = replay
        try:
            await self.audit.received_dicom(
                [
                    (r.info.study_uid, r.info.sop_class_uid, r.path, r.origin, r.peer or "")
                    for r in records
                    if r.source == "dicom"
                ]
            )
        finally:
            self.audit.trail.replaying = False

    def stats(self) -> dict[str, Any]:
        """Counters for status output."""
        return {"received": self.received, "duplicates": self.duplicates, "conflicts": self.conflicts}
