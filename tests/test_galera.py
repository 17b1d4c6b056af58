"""The Galera test cluster (issue 17's groundwork, docs/cluster.md): three real `mariadbd` members with wsrep on
loopback. The gateway's catalog (every migration) runs on it and what one member records the others read; the claim
race the design rests on ends as the design says (the second commit fails with 1213); a member killed with SIGKILL
leaves the other two working and rejoins with what it missed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pymysql
import pytest

from gateway.catalog import InstanceRecord, open_catalog
from gateway.core.dicominfo import read_info
from gateway.devtools.galera import GaleraCluster
from gateway.devtools.studies import make_study
from gateway.storage import Storage
from tests.conftest import wait_for

T = TypeVar("T")


def _records(tmp_path: Path) -> list[InstanceRecord]:
    """Three CT instances stored on a D: in `tmp_path`, as the catalog records them."""
    storage = Storage(tmp_path / "d")
    storage.prepare()
    records = []
    for src in make_study(tmp_path / "s", ct=3, mr=0, sc=0, size=16):
        info = read_info(src)
        stored = storage.store_bytes(src.read_bytes(), info)
        records.append(
            InstanceRecord(
                info, storage.relative(stored.path), stored.size, stored.sha256, "dicom", "", None, 1.0
            )
        )
    return records


async def _soon(
    step: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, timeout: float = 60
) -> T:
    """Repeat a catalog step as the gateway's stages do (a failed step is tried again) until `done` holds; bounded
    in time."""
    deadline = time.monotonic() + timeout
    error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = await step()
            if done(value):
                return value
        except pymysql.err.MySQLError as exc:
            error = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {error})")


@pytest.mark.asyncio
async def test_a_catalog_given_the_members_moves_on_when_its_member_dies_and_comes_home(
    galera: GaleraCluster, tmp_path: Path
) -> None:
    """`[database] url` may list the Galera members, the one on the gateway's own machine first: when it dies the
    catalog goes on on the next, and comes home when the first serves again. `status` names the member in use."""
    db = galera.create_database("dmg_failover")
    records = _records(tmp_path)
    catalog = await open_catalog(galera.url(1, db, 2, 3))
    try:
        assert catalog.db.member_address == "127.0.0.1:3307"
        assert await catalog.record_instances(records[:1]) == 1

        galera.stop_member(1, kill=True)
        # the first step after the death fails (its connection was to member 1); the next runs on member 2
        await _soon(
            lambda: catalog.record_instances(records[1:2]), lambda n: True, "a step on another member"
        )
        assert catalog.db.member_address == "127.0.0.1:3308"
        for record in records[:2]:
            assert await catalog.instance_path(record.info.sop_instance_uid) == record.path

        galera.start_member(1)
        catalog.db.home_check = 0.5  # the gateway looks every 30 s
        await _soon(
            lambda: catalog.instance_path(records[0].info.sop_instance_uid),
            lambda _: catalog.db.member_address == "127.0.0.1:3307",
            "the catalog back on member 1",
        )
        assert await catalog.record_instances(records[2:]) == 1
        third = await open_catalog(galera.url(3, db))
        try:
            assert await third.instance_path(records[2].info.sop_instance_uid) == records[2].path
        finally:
            await third.close()
    finally:
        await catalog.close()
        if galera.state(1) is None:  # the next test wants three members
            galera.start_member(1)


@pytest.mark.asyncio
async def test_the_catalog_runs_on_galera_and_a_killed_member_rejoins(
    galera: GaleraCluster, tmp_path: Path
) -> None:
    assert galera.size() == 3
    db = galera.create_database("dmg_galera")
    records = _records(tmp_path)
    first = await open_catalog(galera.url(1, db))  # every migration, on member 1
    third = await open_catalog(galera.url(3, db))
    try:
        assert await first.record_instances(records[:2]) == 2
        sop = records[0].info.sop_instance_uid
        assert await third.instance_path(sop) == records[0].path, "what member 1 recorded, member 3 reads"

        # a member dies; the other two go on (two of three: still the Primary Component)
        galera.stop_member(2, kill=True)
        wait_for(lambda: galera.size(1) == 2, 60, 0.5, "the cluster to see two members")
        assert await first.record_instances(records[2:]) == 1
        # ... and it comes back with what it missed
        galera.start_member(2)
        second = await open_catalog(galera.url(2, db))
        try:
            assert await second.instance_path(records[2].info.sop_instance_uid) == records[2].path
        finally:
            await second.close()
        assert galera.size(1) == 3
    finally:
        await first.close()
        await third.close()


def test_two_members_claiming_the_same_row_one_commit_wins(galera: GaleraCluster) -> None:
    """What docs/cluster.md's claims rest on: SKIP LOCKED does not see across members, certification does."""
    db = galera.create_database("dmg_galera")
    setup = galera.connect(1)
    with setup.cursor() as cur:
        cur.execute(
            f"CREATE TABLE `{db}`.claims (kind VARCHAR(16), item VARCHAR(64), node VARCHAR(16), fence BIGINT, "
            "lease_until DOUBLE, PRIMARY KEY (kind, item))"
        )
        cur.execute(f"INSERT INTO `{db}`.claims VALUES ('send', 'm1', '', 0, 0)")
    setup.commit()
    setup.close()
    a, b = galera.connect(1), galera.connect(2)
    wait_for(lambda: _visible(b, db), 30, 0.2, "the row on member 2")
    now = time.time()
    claim = (
        f"UPDATE `{db}`.claims SET node = %s, fence = fence + 1, lease_until = %s "
        "WHERE kind = 'send' AND item = 'm1' AND lease_until < %s"
    )
    with a.cursor() as ca, b.cursor() as cb:
        ca.execute(f"SELECT * FROM `{db}`.claims FOR UPDATE SKIP LOCKED")
        cb.execute(f"SELECT * FROM `{db}`.claims FOR UPDATE SKIP LOCKED")
        assert len(ca.fetchall()) == len(cb.fetchall()) == 1, "both members hand out the same row"
        assert ca.execute(claim, ("a", now + 30, now)) == 1 and cb.execute(claim, ("b", now + 30, now)) == 1
    a.commit()
    with pytest.raises(pymysql.err.OperationalError) as lost:
        b.commit()
    assert lost.value.args[0] == 1213, "the loser learns it at commit: a certification conflict"
    with a.cursor() as ca:
        ca.execute(f"SELECT node, fence FROM `{db}`.claims")
        assert ca.fetchall() == (("a", 1),)
    a.close()
    b.close()


def _visible(conn: pymysql.connections.Connection, db: str) -> bool:  # type: ignore[type-arg]
    with conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM `{db}`.claims")
        row = cur.fetchone()
    conn.commit()
    return bool(row and row[0] == 1)
