"""Stage 1, receive: make each C-STORE durable, then index it in the catalog.

In the association thread (`Intake.store`): read the UIDs, move the file into `images/` durably, append one line
to the intake journal and fdatasync it, and only then return, so the SCP answers success. The event loop is woken
with `call_soon_threadsafe`; the association thread never waits for the loop or the database.

On the loop (`Intake.index_forever`): index batches in the catalog. The journal is the bridge across crashes:
at start-up every journal line is indexed again (indexing is idempotent), then the journal is emptied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from gateway.adapters.dicom_scp import Received
from gateway.catalog import Catalog, InstanceRecord
from gateway.config import Settings
from gateway.core.dicominfo import InstanceInfo, read_info
from gateway.storage import Storage, StoreOutcome, fsync_dir

log = logging.getLogger(__name__)

JOURNAL_TRUNCATE_BYTES = 4 * 1024 * 1024


def _record_to_json(r: InstanceRecord) -> str:
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
        },
        separators=(",", ":"),
    )


def _record_from_json(line: str) -> InstanceRecord:
    d = json.loads(line)
    info = InstanceInfo(d["cls"], d["sop"], d["study"], d["series"], d["ts"], d["mod"], d["num"])
    return InstanceRecord(info, d["path"], d["size"], d["sha"], d["src"], d["origin"], d["route"], d["at"])


class IntakeJournal:
    """Append-only, fdatasync'ed record of instances acknowledged to modalities but maybe not yet indexed."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "journal.jsonl"
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fsync_dir(folder)
        self.appended = 0
        self.indexed = 0

    def append(self, record: InstanceRecord) -> None:
        """Durably note one stored instance (called in an association thread)."""
        line = (_record_to_json(record) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            os.fdatasync(self._fd)
            self.appended += 1

    def replay(self) -> list[InstanceRecord]:
        """Every record in the journal (a torn last line from a crash is skipped: it was never acknowledged)."""
        records = []
        for raw in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(_record_from_json(raw))
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

    def clear(self) -> None:
        """Empty the journal after a successful replay."""
        with self._lock:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self.appended = self.indexed = 0

    def close(self) -> None:
        os.close(self._fd)


class Intake:
    """The receive stage: durable store in association threads, catalog indexing on the loop."""

    def __init__(
        self, settings: Settings, storage: Storage, catalog: Catalog, wake_router: asyncio.Event
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.catalog = catalog
        self.journal = IntakeJournal(storage.intake)
        self.wake_router = wake_router
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[InstanceRecord] = asyncio.Queue()
        self.received = 0
        self.duplicates = 0
        self.conflicts = 0

    def store(self, received: Received) -> None:
        """Make one received instance durable (association thread). Raises to refuse it."""
        # Below the reserve the instance is refused with 0xA700 (out of resources); the modality retries later.
        self.storage.check_room()
        info = read_info(received.temp_path)
        partner = self.settings.partner_by_ae(received.called_ae)
        result = self.storage.store_temp_file(received.temp_path, info)
        # crash here: file durable but not journaled; no success was sent, the modality resends; same bytes → duplicate
        if result.outcome is StoreOutcome.CONFLICT:
            self.conflicts += 1
            log.warning(
                "instance %s: same UID, different content: kept aside in conflicts/", info.sop_instance_uid
            )
            return
        record = InstanceRecord(
            info=info,
            path=self.storage.relative(result.path),
            size=result.size,
            sha256=result.sha256,
            source="dicom",
            origin=received.calling_ae,
            route=partner.name if partner else None,
            received_at=time.time(),
        )
        self.journal.append(record)
        # crash here: journaled and durable, success not yet sent; replay indexes it, the modality may resend (duplicate)
        if result.outcome is StoreOutcome.DUPLICATE:
            self.duplicates += 1
        self.received += 1
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.queue.put_nowait, record)

    async def recover(self) -> int:
        """Index what the journal holds from before a crash; return how many instances that was."""
        records = self.journal.replay()
        if records:
            new = await self.catalog.record_instances(records)
            log.info("intake journal: %d records replayed, %d were not yet indexed", len(records), new)
        self.journal.clear()
        return len(records)

    async def index_forever(self) -> None:
        """Index received instances in batches; never dies (a failed batch is retried)."""
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < 500:
                batch.append(self.queue.get_nowait())
            while True:
                try:
                    await self.catalog.record_instances(batch)
                    break
                except Exception:
                    log.exception("catalog indexing failed; retrying in 2 s")
                    await asyncio.sleep(2)
            self.journal.mark_indexed(len(batch))
            self.wake_router.set()

    def stats(self) -> dict[str, Any]:
        """Counters for status output."""
        return {"received": self.received, "duplicates": self.duplicates, "conflicts": self.conflicts}
