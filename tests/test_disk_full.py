"""'D:' full, on a real small tmpfs: refusals with 0xA700, no partial files, pauses, and recovery by itself.

Full means out of bytes or out of inodes: DICOM archives are many small files, and ext4 volumes made with a large
bytes-per-inode ratio run out of inodes first."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core.dicominfo import read_info
from gateway.devtools.studies import make_study
from gateway.storage import free_inodes
from tests.conftest import storescu, wait_for
from tests.test_e2e import assert_delivered_identically


def tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at `mnt` for one test."""
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs standing in for a nearly full D: (grow it with `grow`)."""
    yield from tmpfs(tmp_path / "small-d", "size=3m")


def grow(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)


def a_on(volume: Path, make_gateway, mariadb_url: str, **kw: object):  # type: ignore[no-untyped-def]
    """Gateway B (polling every second) and gateway A with D: on `volume`, a 1 MB reserve, MariaDB; both started."""
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    a = make_gateway(
        "gateway-a",
        [("gateway-b", "gateway-b", "TO_B")],
        database_url=mariadb_url,
        d_root=volume / "d",
        min_free="1MB",
        stability_delay=2,
        **kw,
    )
    b.start()
    a.start()
    return a, b


def instances_at(gw) -> int:  # type: ignore[no-untyped-def]
    return sum(s["instances"] for s in json.loads(gw.cli("status", "--json"))["studies"])


def test_full_d_refuses_with_out_of_resources_and_recovers(
    mail, mariadb_url, make_gateway, small_volume, tmp_path
):  # type: ignore[no-untyped-def]
    a, b = a_on(small_volume, make_gateway, mariadb_url)
    sources = make_study(tmp_path / "s", ct=16, mr=0, sc=0, size=256)  # 16 x 128 KB: more than fits
    first = storescu(a.port, "TO_B", tmp_path / "s", "-v")
    out = first.stdout + first.stderr
    assert "Refused: OutOfResources" in out, out[-2000:]  # storescu's words for status 0xA700
    assert "Received Store Response (Success)" in out, "some instances fit before the reserve"
    images = list((small_volume / "d" / "images").rglob("*.dcm"))
    assert 0 < len(images) < len(sources)
    for f in images:  # every stored file is whole
        read_info(f)
    assert list((small_volume / "d" / "tmp").iterdir()) == [], "no partial file stays behind"

    grow(small_volume)  # an operator frees space: no restart needed
    again = storescu(a.port, "TO_B", tmp_path / "s")
    assert again.returncode == 0, again.stdout + again.stderr
    wait_for(lambda: instances_at(b) == len(sources), 120, 1, "every instance at B")
    assert_delivered_identically(a, b, sources)


def test_full_d_pauses_fetching_and_ingest_until_space_returns(mail, make_gateway, small_volume, tmp_path):  # type: ignore[no-untyped-def]
    b = make_gateway(
        "gateway-b",
        [("gateway-a", "gateway-a", "TO_A")],
        poll_interval=1,
        d_root=small_volume / "d",
        database_url=f"sqlite:///{tmp_path / 'b-catalog.sqlite'}",
        min_free="2MB",
    )
    a = make_gateway(
        "gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1, max_mail_size="512KB"
    )
    b.start()
    a.start()
    sources = make_study(tmp_path / "s", ct=12, mr=0, sc=0, size=256)
    assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0
    wait_for(
        lambda: "free-space reserve" in b.log.read_text() or "too full" in b.log.read_text(),
        60,
        1,
        "B to pause",
    )
    wait_for(lambda: mail.mailbox_count("gateway-b@dicommail.test") > 0, 30, 1, "mails to wait on the server")
    assert instances_at(b) < len(sources)

    grow(small_volume)
    wait_for(lambda: instances_at(b) == len(sources), 120, 1, "B to resume and ingest everything")
    assert_delivered_identically(a, b, sources)
    assert mail.mailbox_count("gateway-b@dicommail.test") == 0


def fill_inodes(folder: Path, leave: int = 0) -> list[Path]:
    """Create empty files in `folder` until the volume has `leave` free inodes (bounded: a tmpfs of few inodes)."""
    folder.mkdir()
    made = []
    for n in range(100_000):
        if leave and (free_inodes(folder) or 0) <= leave:
            break
        try:
            (folder / f"{n:06d}").touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
        made.append(folder / f"{n:06d}")
    return made


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with room for bytes but only 3000 inodes."""
    yield from tmpfs(tmp_path / "few-inodes", "size=64m,nr_inodes=3000")


def test_d_out_of_inodes_refuses_with_out_of_resources_and_recovers(
    mail, mariadb_url, make_gateway, few_inodes, tmp_path
):  # type: ignore[no-untyped-def]
    a, b = a_on(few_inodes, make_gateway, mariadb_url, min_free_inodes=200)
    sources = make_study(tmp_path / "s", ct=6, mr=0, sc=0, size=64)

    # no inode at all: not even the temporary file can be made; every C-STORE is answered, none aborts
    filler = fill_inodes(few_inodes / "filler")
    assert free_inodes(few_inodes) == 0
    none_left = storescu(a.port, "TO_B", tmp_path / "s", "-v", "--no-halt")
    out = none_left.stdout + none_left.stderr
    assert out.count("Refused: OutOfResources") == len(sources), out[-3000:]
    assert "Abort" not in out and "(Success)" not in out, out[-3000:]

    # a few inodes, below the reserve: the dataset is received, then refused, and leaves no file behind
    for f in filler[:50]:
        f.unlink()
    below = storescu(a.port, "TO_B", tmp_path / "s", "-v", "--no-halt")
    out = below.stdout + below.stderr
    assert out.count("Refused: OutOfResources") == len(sources), out[-3000:]
    assert list((few_inodes / "d" / "tmp").iterdir()) == [], "no partial file stays behind"
    assert not list((few_inodes / "d" / "images").rglob("*.dcm"))
    line = next(x for x in a.cli("check-mk").splitlines() if "DMG Free space D:" in x)
    assert line.startswith("2 ") and "inodes free" in line and "below the reserve" in line, line

    # an operator frees inodes: no restart, the modality's resend goes through, the study is delivered
    for f in filler[50:]:
        f.unlink()
    again = storescu(a.port, "TO_B", tmp_path / "s")
    assert again.returncode == 0, again.stdout + again.stderr
    wait_for(lambda: instances_at(b) == len(sources), 120, 1, "every instance at B")
    assert_delivered_identically(a, b, sources)
    assert a.proc is not None and a.proc.poll() is None, "gateway A lived through a volume without inodes"
