"""Group commit on intake (`stages.receive.GroupFlush`): association threads share the flushes of directory
entries and journal lines, and none of them is told "durable" before a flush that began after it asked has
finished; a failed flush is the asking thread's error and is run again for the others."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gateway.stages.receive import GroupFlush, IntakeJournal


class CountingJournal(IntakeJournal):
    """The real journal (its fdatasync runs), with the order of flushes written down; `fail` injects one fault."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lock = threading.Lock()
        self.started = 0
        self.finished: list[int] = []  # the start number of each flush that completed
        self.fail = False

    def sync(self) -> None:
        with self.lock:
            self.started += 1
            mine = self.started
            if self.fail:
                self.fail = False
                raise OSError(5, "injected I/O error")
        super().sync()
        with self.lock:
            self.finished.append(mine)


def test_nobody_returns_before_a_flush_that_began_after_it_asked(tmp_path: Path) -> None:
    journal = CountingJournal(tmp_path / "journal.jsonl")
    flusher = GroupFlush(journal)
    folders = [tmp_path / f"series{i}" for i in range(3)]
    for folder in folders:
        folder.mkdir()
    violations: list[str] = []
    start = threading.Barrier(6)

    def association(n: int) -> None:
        start.wait(timeout=30)
        for i in range(40):
            with journal.lock:
                asked_after = journal.started  # flushes started before this request cannot cover it
            flusher.flush(folders[(n + i) % 3])
            with journal.lock:
                if not any(s > asked_after for s in journal.finished):
                    violations.append(f"thread {n} request {i} returned before its flush")

    threads = [threading.Thread(target=association, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert violations == []
    assert 1 <= flusher.rounds <= 240 and len(journal.finished) == flusher.rounds


def test_a_failed_flush_raises_where_it_ran_and_is_run_again(tmp_path: Path) -> None:
    journal = CountingJournal(tmp_path / "journal.jsonl")
    flusher = GroupFlush(journal)
    folder = tmp_path / "series"
    folder.mkdir()
    journal.fail = True
    with pytest.raises(OSError, match="injected"):
        flusher.flush(folder)
    flusher.flush(folder)  # the next request flushes (the folder is still asked for)
    assert journal.finished == [2] and flusher.rounds == 1


@pytest.mark.parametrize("kernel_call", [True, False])
def test_an_instance_is_placed_without_ever_replacing_one(
    kernel_call: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One atomic rename that never replaces (renameat2), or link + unlink where the filesystem lacks it: the
    first copy of a name wins, a second one stays where it was for the comparison."""
    from gateway import storage

    if not kernel_call:
        monkeypatch.setattr(storage, "_renameat2", False)  # injected: a filesystem without RENAME_NOREPLACE
    first, second, target = tmp_path / "first", tmp_path / "second", tmp_path / "target"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    assert storage.move_noreplace(first, target) is True
    assert storage.move_noreplace(second, target) is False
    assert (target.read_bytes(), first.exists(), second.read_bytes()) == (b"first", False, b"second")
