"""The on-disk queues: one directory per state, one directory per item (content + `meta.json`).

    spool/<queue>/incoming|active|deferred|hold|corrupt|done/<item-id>/{mail.eml, meta.json}

A state change is one `rename` of the item's directory (atomic), followed by an fsync of both parent directories;
the metadata is rewritten durably (temp → fsync → rename) before the move. The spool is the truth for queued
work; the catalog mirrors it for status and history and is reconciled from it at start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from gateway.core.mime import MAX_HEADER_BYTES
from gateway.core.queue import QueueState, after_crash, check_move, is_due
from gateway.storage import Writeback, fsync_dir, makedirs_durable, write_all

CONTENT = "mail.eml"
T = TypeVar("T")
META = "meta.json"


@dataclass
class Item:
    """One queued item as found on disk."""

    id: str
    state: QueueState
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def content(self) -> Path:
        return self.path / CONTENT


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_head(path: Path) -> bytes:
    """A mail's beginning, as much as its headers may take (`mime.MAX_HEADER_BYTES`): what the gateway's process
    reads of a queued mail whose body is opened elsewhere."""
    with path.open("rb") as f:
        return f.read(MAX_HEADER_BYTES + 4)


class Spool:
    """One queue (e.g. `outbox`, `inbox`) with a directory per state."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp
        self.dirs = {state: root / state.value for state in QueueState}

    def prepare(self) -> None:
        for d in self.dirs.values():
            makedirs_durable(d)

    def find(self, item_id: str) -> Item | None:
        """The item with this id, in whatever state it is."""
        for state, d in self.dirs.items():
            p = d / item_id
            if p.is_dir():
                return Item(item_id, state, p, self._meta(p))
        return None

    @staticmethod
    def _meta(path: Path) -> dict[str, Any]:
        try:
            return dict(json.loads((path / META).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}

    def put(self, item_id: str, data: bytes | bytearray, meta: dict[str, Any]) -> Item:
        """Enqueue new content durably in INCOMING; an id already queued in any state is left as it is."""
        return self.put_stream(item_id, lambda f: f.write(data), meta)

    def put_stream(self, item_id: str, write: Callable[[BinaryIO], object], meta: dict[str, Any]) -> Item:
        """`put`, with the content written by `write(file)` in pieces (a reassembled message is never in memory)."""
        existing = self.find(item_id)
        if existing is not None:
            return existing

        def content(staging: Path) -> None:
            with (staging / CONTENT).open("wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())

        return self._enqueue(item_id, content, meta)

    def put_file(self, item_id: str, path: Path, meta: dict[str, Any]) -> Item:
        """`put` for content already written to `path` (below tmp/, the same filesystem): fsynced and moved in,
        never read or copied; `path` is gone afterwards (moved, or removed when the id is already queued)."""
        existing = self.find(item_id)
        if existing is not None:
            path.unlink(missing_ok=True)
            return existing

        def content(staging: Path) -> None:
            with path.open("rb") as f:
                os.fsync(f.fileno())
            os.rename(path, staging / CONTENT)  # its name is made durable with the meta file's (same folder)

        return self._enqueue(item_id, content, meta)

    def _enqueue(self, item_id: str, content: Callable[[Path], None], meta: dict[str, Any]) -> Item:
        """A staging folder in tmp/ with the content (`content(folder)`) and meta.json, renamed into INCOMING."""
        staging = self.tmp / f".spool-{item_id}.{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            content(staging)
            _write_json(staging / META, {**meta, "created": meta.get("created", time.time())})
            target = self.dirs[QueueState.INCOMING] / item_id
            # crash before this rename: only a staging folder in tmp/ (removed at start-up); nothing queued
            os.rename(staging, target)
            fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Item(item_id, QueueState.INCOMING, target, self._meta(target))

    def drop_content(self, item: Item, reason: str, now: float) -> Item:
        """Remove a held item's bytes and keep its metadata with the reason (the quota for unauthenticated
        content); the item stays listed, with `content_dropped`."""
        item = self.update(item, content_dropped=reason, dropped_at=now)
        (item.path / CONTENT).unlink(missing_ok=True)
        fsync_dir(item.path)
        return item

    @staticmethod
    def stage_content(item_dir: Path, write: Callable[[Callable[[bytes], object]], T]) -> tuple[T, int]:
        """Write an item's content below a staging folder, in pieces (`write(sink)`), and fsync it: the kernel
        starts writing every few megabytes, so the fsync at the end has little left to wait for. (what `write`
        returned, the content's size). The item's directory entries become durable with `settle`."""
        item_dir.mkdir(parents=True, exist_ok=True)
        with (item_dir / CONTENT).open("wb", buffering=0) as f:
            written = Writeback(f.fileno())

            def sink(data: bytes) -> None:
                write_all(f, data)
                written.wrote(len(data))

            result = write(sink)
            os.fsync(f.fileno())
        return result, written.size

    @staticmethod
    def stage_meta(item_dir: Path, meta: dict[str, Any]) -> None:
        """Write a staged item's meta.json (fsynced; its name becomes durable with `settle`)."""
        with (item_dir / META).open("w", encoding="utf-8") as f:
            json.dump({**meta, "created": meta.get("created", time.time())}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def prepare_item(folder: Path, item_id: str, data: bytes, meta: dict[str, Any]) -> Path:
        """Write an item's directory below `folder` (a staging area on the same filesystem); durable once the
        folder is settled (`settle`)."""
        item_dir = folder / item_id
        Spool.stage_content(item_dir, lambda sink: sink(data))
        Spool.stage_meta(item_dir, meta)
        return item_dir

    @staticmethod
    def settle(folder: Path) -> None:
        """Make every item staged below `folder` durable by name: one fsync per item directory and one of the
        folder, after all were written (the filesystem's journal commits them together), instead of a flush
        per file as each is made."""
        for item_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            fsync_dir(item_dir)
        fsync_dir(folder)
        fsync_dir(folder.parent)

    def adopt_all(self, item_dirs: list[Path]) -> None:
        """`adopt` for a whole staged set, with one fsync of each folder at the end instead of two per item; a
        crash before them leaves each item either staged or queued, and start-up adopts the staged ones again."""
        parents = set()
        for item_dir in item_dirs:
            parents.add(item_dir.parent)
            if self.find(item_dir.name) is not None:
                shutil.rmtree(item_dir, ignore_errors=True)
            else:
                os.rename(item_dir, self.dirs[QueueState.INCOMING] / item_dir.name)
        for parent in sorted(parents):
            fsync_dir(parent)
        fsync_dir(self.dirs[QueueState.INCOMING])

    def adopt(self, item_dir: Path) -> Item:
        """Move a prepared item directory into INCOMING (idempotent when it is already queued)."""
        existing = self.find(item_dir.name)
        if existing is not None:
            shutil.rmtree(item_dir, ignore_errors=True)
            return existing
        target = self.dirs[QueueState.INCOMING] / item_dir.name
        os.rename(item_dir, target)
        # crash here: the rename may be lost until the directories are synced; start-up adopts it again
        fsync_dir(item_dir.parent)
        fsync_dir(target.parent)
        return Item(item_dir.name, QueueState.INCOMING, target, self._meta(target))

    def move(self, item: Item, new: QueueState, drop_content: bool = False, **meta: Any) -> Item:
        """Move an item to `new` (checked against the table), updating its metadata first."""
        check_move(item.state, new)
        merged = {**item.meta, **meta, "state_since": time.time()}
        _write_json(item.path / META, merged)
        target = self.dirs[new] / item.id
        # crash between the metadata write and the rename: the item stays in its old state, with newer metadata
        os.rename(item.path, target)
        fsync_dir(item.path.parent)
        fsync_dir(target.parent)
        if drop_content:
            (target / CONTENT).unlink(missing_ok=True)  # done: the catalog keeps the history, not the bytes
        return Item(item.id, new, target, merged)

    def items(self, state: QueueState) -> list[Item]:
        """Items in one state, oldest first."""
        found = [Item(p.name, state, p, self._meta(p)) for p in self.dirs[state].iterdir() if p.is_dir()]
        return sorted(found, key=lambda i: (float(i.meta.get("created", 0)), i.id))

    def due(self, now: float, limit: int = 100) -> list[Item]:
        """Incoming and due deferred items, oldest first."""
        candidates = self.items(QueueState.INCOMING) + self.items(QueueState.DEFERRED)
        due = [i for i in candidates if is_due(i.state, i.meta, now)]
        return sorted(due, key=lambda i: (float(i.meta.get("created", 0)), i.id))[:limit]

    def next_due(self) -> float | None:
        """When the earliest deferred item is due."""
        times = [float(i.meta.get("next_attempt", 0)) for i in self.items(QueueState.DEFERRED)]
        return min(times) if times else None

    def recover(self) -> list[Item]:
        """Start-up: items left ACTIVE by a crash go back to INCOMING, or to CORRUPT after too many crashes."""
        moved = []
        for item in self.items(QueueState.ACTIVE):
            new, meta = after_crash(item.meta)
            moved.append(self.move(item, new, **meta))
        return moved

    def counts(self) -> dict[str, int]:
        """How many items each state holds."""
        return {
            state.value: sum(1 for p in d.iterdir() if p.is_dir())
            for state, d in self.dirs.items()
            if d.exists()
        }

    def update(self, item: Item, **meta: Any) -> Item:
        """Rewrite an item's metadata in place (no state change)."""
        merged = {**item.meta, **meta}
        _write_json(item.path / META, merged)
        return Item(item.id, item.state, item.path, merged)

    def prune_done(self, older_than: float, now: float) -> int:
        """Remove DONE items older than `older_than` seconds (the catalog keeps their history)."""
        removed = 0
        for item in self.items(QueueState.DONE):
            if now - float(item.meta.get("state_since", item.meta.get("created", now))) > older_than:
                shutil.rmtree(item.path, ignore_errors=True)
                removed += 1
        return removed

    def discard(self, item: Item) -> None:
        """Remove an item entirely (a half-built set that will be rebuilt)."""
        shutil.rmtree(item.path, ignore_errors=True)
        fsync_dir(item.path.parent)
