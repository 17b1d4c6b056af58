"""The files on the working volume ("D:", `storage.d_root`), always written durably.

Layout below `d_root`:

    images/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   instances, byte for byte as received
    conflicts/<SOPInstanceUID>.<sha256[:16]>.dcm         same UID, different content: kept aside, reported
    spool/outbox/<state>/<transfer>.<part>/               outbound mails; state: incoming active deferred hold
                                                          corrupt done (see gateway/spool.py)
    spool/outbox-staging/<transfer>/                      a set being built (moved into outbox when complete)
    spool/inbox/<state>/<mail-key>/                       fetched mails; hold = quarantined, with the reason
    spool/intake/journal-<receiver>.jsonl                 received-instance journals, one per receiver process (stages/receive.py)
    spool/commitments/<transaction>.<ns>.<pid>.json       PACS storage commitment reports, saved before they are answered
    tmp/                                                  temp files, same filesystem so rename is atomic
    catalog.sqlite                                        the embedded catalog (default database)
    state/gateway.lock                                    held (flock) by the one gateway running on this volume
    nodes/<node>/{tmp,intake,state}/                      a cluster node's own temp files, journals and state
                                                          (docs/cluster.md), instead of tmp/, spool/intake/, state/

Every write is temp file → fsync → rename → fsync of the directory, so a crash leaves either the old state or
the new one, never a torn file.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from gateway.core.dicominfo import InstanceInfo, NotDicomError, dataset_offset
from gateway.volume import node_state

_SAFE = re.compile(r"^[0-9A-Za-z._-]{1,128}$")
_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Make a directory entry change (create, rename, unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


_sync_file_range = _libc_sync_file_range()


def write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    """Write all of `data` to an unbuffered file, which may take less than it is given at a time."""
    view = memoryview(data)
    while view:
        view = view[f.write(view) or 0 :]


class Writeback:
    """Has the kernel start writing a file's pages every `every` bytes written to it (`wrote(n)` after each
    write), so that the fsync after its last byte has little left to wait for."""

    def __init__(self, fd: int, every: int = 4 << 20) -> None:
        self.fd, self.every, self.size, self.started = fd, every, 0, 0

    def wrote(self, n: int) -> None:
        self.size += n
        if self.size - self.started >= self.every:
            start_writeback(self.fd)
            self.started = self.size


def start_writeback(fd: int) -> None:
    """Linux: have the kernel start writing a file's dirty pages now, without waiting (SYNC_FILE_RANGE_WRITE),
    so that the fsync after the file's last byte has less left to wait for; elsewhere nothing."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, 2)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_renameat2: Any = None


def move_noreplace(src: Path, dst: Path) -> bool:
    """Move `src` to `dst` unless `dst` exists (False then, `src` untouched): one atomic rename that never
    replaces (Linux `renameat2(RENAME_NOREPLACE)`: one metadata change where `link` + `unlink` are two, each of
    which may wait for the filesystem's journal while other threads flush); `link` + `unlink` where the kernel
    or the filesystem does not offer it (the same guarantee, one step more)."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    src.unlink()  # crash before this: a stray temp file, removed at start-up
    return True


def makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing each parent whose entry list changed."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def write_durable(target: Path, chunks: Iterable[bytes], tmp_dir: Path) -> int:
    """Write `chunks` to `target` atomically and durably; return the size."""
    makedirs_durable(target.parent)
    tmp = tmp_dir / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    size = 0
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # disk full, I/O error: no partial file stays behind
        raise
    # crash here: a stray .tmp in tmp/ (removed at start-up), target unchanged
    os.replace(tmp, target)
    # crash here: rename may be lost with the directory not yet synced; the caller has not acknowledged yet
    fsync_dir(target.parent)
    return size


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safe(component: str) -> str:
    """A path component from a UID; anything odd is replaced by its hash so paths can never escape."""
    return (
        component
        if _SAFE.match(component) and component not in (".", "..")
        else hashlib.sha256(component.encode()).hexdigest()[:32]
    )


class StoreOutcome(StrEnum):
    """What happened to an instance handed to storage."""

    STORED = "stored"  # new instance, now durable
    DUPLICATE = "duplicate"  # same UID, identical bytes already stored: nothing written
    CONFLICT = "conflict"  # same UID, different bytes: kept under conflicts/, original untouched


@dataclass(frozen=True)
class StoreResult:
    """The durable result of storing one instance."""

    outcome: StoreOutcome
    path: Path
    sha256: str
    size: int


class DiskFullError(OSError):
    """Free space or free inodes on the working volume are below the reserve (`storage.min_free`, `min_free_inodes`)."""

    def __init__(self, free: int, reserve: int, unit: str = "bytes") -> None:
        super().__init__(errno.ENOSPC, f"D: has {free} {unit} free, below the reserve of {reserve}")


def free_inodes(path: Path) -> int | None:
    """Free inodes of the filesystem holding `path` (None where it has no fixed number, as btrfs)."""
    return _inodes_of(os.statvfs(path))


def _inodes_of(st: os.statvfs_result) -> int | None:
    return int(st.f_favail) if st.f_files else None


def _dataset_start(f: BinaryIO) -> int | None:
    """Where the dataset of an open Part 10 file begins (after its file meta group), or None."""
    f.seek(0)
    try:
        return dataset_offset(f.read(144))
    except NotDicomError:
        return None


def same_dataset(a: Path, b: Path) -> bool:
    """True when two Part 10 files hold the same dataset bytes, whatever their file meta headers say (the
    identity of an instance is its dataset; the transfer syntax is in the dataset's encoding). Streamed."""
    with a.open("rb") as fa, b.open("rb") as fb:
        start_a, start_b = _dataset_start(fa), _dataset_start(fb)
        if start_a is None or start_b is None:
            return False
        if a.stat().st_size - start_a != b.stat().st_size - start_b:
            return False
        fa.seek(start_a)
        fb.seek(start_b)
        while True:
            chunk_a, chunk_b = fa.read(_CHUNK), fb.read(_CHUNK)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


class Storage:
    """The working volume: paths and durable writes. Thread-safe (used from DICOM association threads).
    A cluster node (`node`) shares everything but its temp files, intake journals and state."""

    def __init__(self, d_root: Path, min_free: int = 0, min_free_inodes: int = 0, node: str = "") -> None:
        self.root = d_root
        self.min_free = min_free
        self.min_free_inodes = min_free_inodes
        self.images = d_root / "images"
        self.conflicts = d_root / "conflicts"
        self.spool = d_root / "spool"
        self.outbox = self.spool / "outbox"
        self.outbox_staging = self.spool / "outbox-staging"
        self.inbox = self.spool / "inbox"
        self.commitments = self.spool / "commitments"  # storage commitment reports not yet applied
        self.node = node
        own = d_root / "nodes" / node if node else None
        self.intake = own / "intake" if own else self.spool / "intake"
        self.tmp = own / "tmp" if own else d_root / "tmp"
        self.state = d_root / "state"  # shared: the fetch's memory, the web index's cache
        self.node_state = node_state(d_root, node)
        self._lock = threading.Lock()

    def prepare(self, clean_tmp: bool = True) -> int:
        """Create the layout and remove temp files a crash left behind; return how many were removed.

        Only the holder of the volume lock may clean: beside a running gateway, tmp/ holds its in-flight C-STORE
        temp files and staging (`clean_tmp=False` then)."""
        for d in (
            self.images,
            self.conflicts,
            self.outbox_staging,
            self.intake,
            self.tmp,
        ):
            makedirs_durable(d)
        removed = 0
        if not clean_tmp:
            return 0
        for stray in self.tmp.iterdir():
            if stray.is_dir():
                shutil.rmtree(stray)
            else:
                stray.unlink()
            removed += 1
        return removed

    def instance_path(self, info: InstanceInfo) -> Path:
        """Where an instance lives."""
        return (
            self.images
            / _safe(info.study_uid)
            / _safe(info.series_uid)
            / f"{_safe(info.sop_instance_uid)}.dcm"
        )

    def relative(self, path: Path) -> str:
        """A path relative to d_root (what the catalog records)."""
        return str(path.relative_to(self.root))

    def _place(
        self, info: InstanceInfo, tmp: Path, sha: str, size: int, sync_dir: bool = True
    ) -> StoreResult:
        """Move a fully written and fsynced temp file into place, deduplicating by UID and content.

        Several processes store at once (the DICOM receivers, the mail ingest), so the place is taken with a
        rename that fails if the name exists (`move_noreplace`): of two copies of one UID arriving together,
        exactly one is stored and the other is compared with it (duplicate or conflict), never silently replaced. With `sync_dir`
        false the new name is not yet durable: the caller fsyncs `result.path.parent` before it tells anyone
        (the receivers do that for several instances at once: `GroupFlush`)."""
        target = self.instance_path(info)
        with self._lock:
            makedirs_durable(target.parent)
            if move_noreplace(tmp, target):
                outcome = StoreOutcome.STORED
            elif (target.stat().st_size == size and sha256_file(target) == sha) or same_dataset(target, tmp):
                # the same instance: byte for byte, or with only another file meta header (another toolkit wrote
                # the Part 10 wrapper); the stored file stays as it is
                tmp.unlink()
                outcome = StoreOutcome.DUPLICATE
            else:
                makedirs_durable(self.conflicts)
                aside = self.conflicts / f"{_safe(info.sop_instance_uid)}.{sha[:16]}.dcm"
                os.replace(tmp, aside)
                fsync_dir(self.conflicts)
                return StoreResult(StoreOutcome.CONFLICT, aside, sha, size)
        # crash here: the new name may not survive until the directory is synced; nothing acknowledged yet. A
        # duplicate syncs too: the copy it matched may have been linked a moment ago by a thread or process whose
        # own flush has not happened yet, and this one is about to be acknowledged.
        if sync_dir:
            fsync_dir(target.parent)  # outside the lock: another thread's link need not wait for this flush
        return StoreResult(outcome, target, sha, size)

    def store_temp_file(
        self, tmp: Path, info: InstanceInfo, digest: tuple[str, int] | None = None, sync_dir: bool = True
    ) -> StoreResult:
        """Store a file already written below `tmp/` (the DICOM receive path); fsyncs it first.

        `digest` is the (SHA-256, size) its writer computed on the way in; without it the file is read again.
        `sync_dir`: see `_place`."""
        with tmp.open("rb+") as f:
            if digest is None:
                h = hashlib.sha256()
                size = 0
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                digest = h.hexdigest(), size
            os.fsync(f.fileno())
        return self._place(info, tmp, *digest, sync_dir=sync_dir)

    def place_synced(self, files: list[tuple[Path, InstanceInfo, str, int]]) -> list[StoreResult]:
        """Store files below `tmp/` that their writer already fsynced (tmp file, info, SHA-256, size): each is
        placed without a flush of its own, then every directory that got a name is flushed once, so the names are
        durable together when this returns (a mail's instances: one flush per series instead of one per file)."""
        results = [self._place(info, tmp, sha, size, sync_dir=False) for tmp, info, sha, size in files]
        for folder in sorted({r.path.parent for r in results}):
            fsync_dir(folder)
        return results

    def store_copy(self, src: Path, info: InstanceInfo) -> StoreResult:
        """Store a copy of a file (the `send` command): streamed in chunks and hashed on the way, never whole in
        memory."""
        tmp = self.tmp / f".cp.{_safe(info.sop_instance_uid)}.{os.getpid()}.{threading.get_ident()}.tmp"
        h = hashlib.sha256()
        size = 0
        try:
            with src.open("rb") as fin, tmp.open("wb") as fout:
                while chunk := fin.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._place(info, tmp, h.hexdigest(), size)

    def store_bytes(self, data: bytes, info: InstanceInfo) -> StoreResult:
        """Store an instance held in memory (the mail ingest path)."""
        tmp = self.tmp / f".in.{_safe(info.sop_instance_uid)}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # disk full, I/O error: no partial file stays behind
            raise
        return self._place(info, tmp, hashlib.sha256(data).hexdigest(), len(data))

    def free_bytes(self) -> int:
        """Free space on the working volume."""
        return shutil.disk_usage(self.root).free

    def free_inodes(self) -> int | None:
        """Free inodes on the working volume (None: the filesystem has no fixed number, as btrfs)."""
        return free_inodes(self.root)

    def has_room(self) -> bool:
        """True while free space and free inodes are above their reserves."""
        try:
            self.check_room()
        except DiskFullError:
            return False
        return True

    def check_room(self) -> None:
        """Raise `DiskFullError` when free space or free inodes are below their reserve.

        Every instance takes an inode, so a volume of many small files can run out of inodes with bytes to spare.
        """
        st = os.statvfs(self.root)  # one call for both (this runs for every instance received)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free:
            raise DiskFullError(free, self.min_free)
        inodes = _inodes_of(st)
        if inodes is not None and inodes < self.min_free_inodes:
            raise DiskFullError(inodes, self.min_free_inodes, "inodes")

    def sweep_tmp(self, older_than: float, now: float) -> int:
        """Remove temp files older than `older_than` seconds (left by aborted receives); return how many."""
        removed = 0
        for f in self.tmp.iterdir():
            try:
                if f.is_file() and now - f.stat().st_mtime > older_than:
                    f.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
