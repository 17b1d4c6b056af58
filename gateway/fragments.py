"""Durable reassembly of `message/partial` fragments (RFC 2046), across polls and restarts.

    spool/fragments/<group>/{<number>.eml, meta.json}      group = hash of (sender, fragment id)

Each fragment is written durably (temp → fsync → rename) before its inbox item is closed, so a fragment is never
only in memory. When every number from 1 to the total is present, the whole mail is put together and queued in the
inbox under a stable id (`partial-<group>`); only then is the group removed. A crash in between is finished at the
next fragment or at start-up (`sweep`), and the inbox's own de-duplication keeps the mail from being queued twice.
Groups still incomplete after `mail.reassembly_deadline` are reported (status, monitoring), never dropped silently;
an operator may discard them with `dicom-mail-gateway queue discard`.

Fragments carry no signature of their own, and the From: that names their group can be forged: until the whole
message is reassembled and verified, a group is unauthenticated content. Its bytes count against the quota for
unauthenticated content (`gateway.untrusted`), which may drop the oldest groups (`drop`: the fragments go, the
group's meta.json stays with the reason, and later fragments of it are not stored again); a group larger than the
largest message a partner may send is dropped at once. Reassembly streams one fragment at a time into the inbox.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.core import partial
from gateway.spool import Spool
from gateway.storage import Storage, fsync_dir, makedirs_durable


@dataclass(frozen=True)
class Group:
    """One message being reassembled."""

    key: str
    sender: str
    fragment_id: str
    have: int
    total: int | None
    first_seen: float
    last_seen: float
    bytes: int = 0
    dropped: str | None = None  # why its fragments were dropped (quota, size); the group stays listed

    def describe(self, deadline: float, now: float) -> dict[str, object]:
        """For status output (`status`, health.json): no patient data, the sender is a partner's address."""
        return {
            "key": self.key,
            "sender": self.sender,
            "have": self.have,
            "total": self.total,
            "first_seen": self.first_seen,
            "bytes": self.bytes,
            "dropped": self.dropped,
            "overdue": now - self.first_seen > deadline,
        }


class GroupDropped(Exception):
    """The fragment belongs to a group whose fragments were dropped (quota or size): it is not stored."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FragmentStore:
    """Holds fragments until their message is complete."""

    def __init__(self, root: Path, tmp: Path, max_message: int = 1 << 62) -> None:
        self.root = root
        self.tmp = tmp
        self.max_message = max_message  # a group whose fragments add up to more is dropped

    @classmethod
    def of(cls, storage: Storage, max_message: int = 1 << 62) -> FragmentStore:
        """The store in its place on D: (spool/fragments)."""
        return cls(storage.spool / "fragments", storage.tmp, max_message)

    def prepare(self) -> None:
        makedirs_durable(self.root)

    @staticmethod
    def group_key(sender: str, fragment_id: str) -> str:
        return hashlib.sha256(f"{sender.lower()}\0{fragment_id}".encode()).hexdigest()[:32]

    def _meta(self, folder: Path) -> dict[str, object]:
        try:
            return dict(json.loads((folder / "meta.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}

    def _write(self, target: Path, data: bytes | bytearray) -> None:
        tmp = target.with_name(f".{target.name}.tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def add(self, sender: str, raw: bytes | bytearray, now: float) -> str:
        """Store one fragment durably (idempotent); return its group key. Raises MailFormatError if malformed,
        `GroupDropped` if its group was dropped (or is dropped now, for growing past `max_message`)."""
        frag = partial.read_fragment(bytes(raw[: partial.MAX_HEADER_BYTES + 4]))
        key = self.group_key(sender, frag.id)
        folder = self.root / key
        if not folder.exists():
            makedirs_durable(folder)
        meta = self._meta(folder)
        if meta.get("dropped"):
            raise GroupDropped(str(meta["dropped"]))
        total = frag.total or meta.get("total")
        target = folder / f"{frag.number:05d}.eml"
        size = int(meta.get("bytes", 0) or 0) + (0 if target.exists() else len(raw))  # type: ignore[call-overload]
        self._write(target, raw)
        meta = {
            "sender": sender.lower(),
            "id": frag.id,
            "total": total,
            "first_seen": meta.get("first_seen", now),
            "last_seen": now,
            "bytes": size,
        }
        self._write(folder / "meta.json", json.dumps(meta).encode())
        if size > self.max_message:
            reason = f"fragments add up to more than the largest message a partner may send ({self.max_message} bytes)"
            self.drop(key, reason, now)
            raise GroupDropped(reason)
        return key

    def drop(self, key: str, reason: str, now: float) -> int:
        """Drop a group's fragments (the quota, or a group too large), keeping its meta.json with the reason so
        that it stays listed and later fragments of it are not stored again. Returns the bytes freed."""
        folder = self.root / key
        meta = self._meta(folder)
        freed = 0
        for p in self._numbers(folder).values():
            freed += p.stat().st_size
            p.unlink(missing_ok=True)
        self._write(folder / "meta.json", json.dumps({**meta, "dropped": reason, "dropped_at": now}).encode())
        return freed

    def _numbers(self, folder: Path) -> dict[int, Path]:
        return {int(p.stem): p for p in folder.glob("*.eml") if p.stem.isdigit()}

    def complete(self, key: str, inbox: Spool) -> str | None:
        """Queue the whole mail if every fragment is here (then drop the group); the inbox item id, or None."""
        folder = self.root / key
        meta = self._meta(folder)
        total = meta.get("total")
        numbers = self._numbers(folder) if folder.exists() else {}
        if meta.get("dropped") or not isinstance(total, int) or sorted(numbers) != list(range(1, total + 1)):
            return None
        item_id = f"partial-{key}"
        if inbox.find(item_id) is None:
            # one fragment in memory at a time: the message is written straight into the inbox item
            inbox.put_stream(
                item_id,
                lambda out: partial.reassemble_into(total, lambda n: numbers[n].read_bytes(), out),
                {"source": "message/partial", "fragments": total, "sender": meta.get("sender", "")},
            )
        # crash here: the mail is queued, the group still exists; `sweep` or the next fragment removes it
        shutil.rmtree(folder, ignore_errors=True)
        fsync_dir(self.root)
        return item_id

    def sweep(self, inbox: Spool) -> list[str]:
        """Start-up: queue every group that became complete before a crash."""
        done = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.exists() else []:
            item = self.complete(folder.name, inbox)
            if item:
                done.append(item)
        return done

    def groups(self) -> list[Group]:
        """Every incomplete message, oldest first."""
        out = []
        for folder in self.root.iterdir() if self.root.exists() else []:
            if not folder.is_dir():
                continue
            meta = self._meta(folder)
            total = meta.get("total")
            out.append(
                Group(
                    key=folder.name,
                    sender=str(meta.get("sender", "")),
                    fragment_id=str(meta.get("id", "")),
                    have=len(self._numbers(folder)),
                    total=total if isinstance(total, int) else None,
                    first_seen=float(meta.get("first_seen", 0) or 0),  # type: ignore[arg-type]
                    last_seen=float(meta.get("last_seen", 0) or 0),  # type: ignore[arg-type]
                    bytes=int(meta.get("bytes", 0) or 0),  # type: ignore[call-overload]
                    dropped=str(meta["dropped"]) if meta.get("dropped") else None,
                )
            )
        return sorted(out, key=lambda g: g.first_seen)

    def overdue(self, deadline: float, now: float | None = None) -> list[Group]:
        """Incomplete messages whose first fragment is older than `deadline` seconds."""
        now = time.time() if now is None else now
        return [g for g in self.groups() if now - g.first_seen > deadline]

    def discard(self, key: str) -> bool:
        """An operator gave up on an incomplete message."""
        folder = self.root / key
        if not folder.is_dir():
            return False
        shutil.rmtree(folder)
        return True
