"""The cluster's claims and roles on the embedded catalog (fast tier; the same on Galera in tests/test_cluster.py):
a claim is held until its lease runs out, then another node takes it with a higher fence; a node that lost a
claim learns it at its next heartbeat; a node's restart frees its last run's claims; roles move to a live node;
items a dead node left active go back to incoming with the crash counted. And the configuration's checks."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from gateway.catalog import open_catalog
from gateway.catalog.db import MysqlTarget
from gateway.cluster import INGEST, ROLES, SEND, Cluster, cluster_view
from gateway.config import ClusterSettings, ConfigError
from gateway.core.queue import QueueState
from gateway.spool import Spool
from tests.conftest import minimal_settings


@pytest.mark.asyncio
async def test_a_claim_is_held_until_its_lease_runs_out_then_taken_with_a_higher_fence(
    tmp_path: Path,
) -> None:
    catalog = await open_catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    try:
        now = time.time()
        assert await catalog.take_claim(SEND, "m1", "a", now, 30) == 1
        assert await catalog.take_claim(SEND, "m1", "b", now + 29, 30) is None, "held: b cannot take it"
        assert await catalog.take_claim(SEND, "m1", "a", now + 1, 30) is None, "not even a, twice"
        assert await catalog.take_claim(SEND, "m2", "b", now, 30) == 1, "another item is free"
        # a's heartbeat stops; after the lease, b takes m1 over and a's fence no longer counts
        assert await catalog.take_claim(SEND, "m1", "b", now + 31, 30) == 2
        assert not await catalog.holds(SEND, "m1", "a", 1, now + 31)
        assert await catalog.holds(SEND, "m1", "b", 2, now + 31)
        assert not await catalog.release_claim(SEND, "m1", "a", 1), "a late release by the old holder is void"
        held = await catalog.heartbeat("a", "host", 1, now, now + 32, 30, {"sent_mails": 3})
        assert held == [], "a's heartbeat shows it holds nothing any more"
        held = await catalog.heartbeat("b", "host", 2, now, now + 32, 30, {})
        assert sorted(c.item for c in held) == ["m1", "m2"]
        assert all(c.lease_until == now + 62 for c in held), "the heartbeat renewed b's claims"
        assert await catalog.release_claim(SEND, "m1", "b", 2)
        assert await catalog.take_claim(SEND, "m1", "a", now + 33, 30) == 1, "released: free again at once"
        nodes = {n["node"]: n for n in await catalog.cluster_nodes()}
        assert nodes["a"]["counters"] == {"sent_mails": 3} and nodes["b"]["heartbeat"] == now + 32
        # a restarts: its last run's claims are free at once (its lock on D: says that run is gone)
        assert await catalog.drop_claims("a") == 1
        assert await catalog.take_claim(SEND, "m1", "b", now + 34, 30) is not None
    finally:
        await catalog.close()


@pytest.mark.asyncio
async def test_two_nodes_racing_for_the_same_items_each_item_goes_to_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    first, second = await open_catalog(url), await open_catalog(url)
    try:
        now = time.time()
        items = [f"m{n}" for n in range(40)]
        got = await asyncio.gather(
            *(
                c.take_claim(INGEST, i, node, now, 30)
                for i in items
                for c, node in ((first, "a"), (second, "b"))
            )
        )
        pairs = list(zip(got[0::2], got[1::2], strict=True))
        assert all((x is None) != (y is None) for x, y in pairs), "exactly one node won each item"
    finally:
        await first.close()
        await second.close()


def _cluster(catalog, node: str, outbox: Spool, lease: float = 30) -> Cluster:  # type: ignore[no-untyped-def]
    return Cluster(ClusterSettings(node, lease, lease / 3, 2 * lease), catalog, {SEND: outbox})


@pytest.mark.asyncio
async def test_roles_run_on_one_node_and_a_dead_nodes_active_items_are_taken_over(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    cat_a, cat_b = await open_catalog(url), await open_catalog(url)
    outbox = Spool(tmp_path / "d" / "spool" / "outbox", tmp_path / "d" / "tmp")
    outbox.prepare()
    (tmp_path / "d" / "tmp").mkdir(parents=True)
    try:
        a, b = _cluster(cat_a, "a", outbox, lease=0.6), _cluster(cat_b, "b", outbox, lease=0.6)
        await a.start()
        await b.start()
        assert sorted(a.view()["roles"]) == sorted(ROLES) and b.view()["roles"] == [], (
            "the first node runs all"
        )
        # a takes a mail and starts sending it (active), then dies without a word
        item = outbox.put("t1.00001", b"mail", {"message_id": "<1@x>"})
        claimed = await a.take_item(outbox, SEND, item)
        assert claimed is not None and await b.take_item(outbox, SEND, item) is None, "b may not touch it"
        outbox.move(claimed, QueueState.ACTIVE)
        await b.beat()
        assert outbox.find("t1.00001").state is QueueState.ACTIVE, "a's lease runs: its work stays with it"
        deadline = time.monotonic() + 10
        while b.view()["roles"] != sorted(ROLES) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # a beats no more; its lease runs out
            await b.beat()
        assert b.view()["roles"] == sorted(ROLES), "every role moved to b"
        found = outbox.find("t1.00001")
        assert found.state is QueueState.INCOMING and found.meta["crashes"] == 1, "back to incoming, counted"
        assert found.meta["taken_over_by"] == "b"
        assert await b.take_item(outbox, SEND, found) is not None, "b sends it now"
    finally:
        await cat_a.close()
        await cat_b.close()


def test_a_cluster_needs_the_shared_catalog_and_a_heartbeat_inside_the_lease(
    tmp_path: Path, pki_dir: Path
) -> None:
    cert, key = pki_dir / "gateway-b-smime.pem", pki_dir / "gateway-b-smime.key"
    with pytest.raises(ConfigError) as err:
        minimal_settings(tmp_path, pki_dir, cert, key, cluster={"node": "gw1"})
    assert err.value.key == "database.url", "SQLite on one machine cannot be a cluster's catalog"
    mysql = {"database": {"url": "mysql://root@127.0.0.1:3306/x"}}
    with pytest.raises(ConfigError) as err:
        minimal_settings(tmp_path, pki_dir, cert, key, cluster={"node": "gw1", "heartbeat": 20}, **mysql)
    assert err.value.key == "cluster.heartbeat"
    with pytest.raises(ConfigError) as err:
        minimal_settings(tmp_path, pki_dir, cert, key, cluster={"node": "gw 1"}, **mysql)
    assert err.value.key == "cluster.node"
    s = minimal_settings(tmp_path, pki_dir, cert, key, cluster={"node": "gw1", "lease": 12}, **mysql)
    assert s.cluster == ClusterSettings("gw1", 12.0, 4.0, 24.0)
    assert s.audit_dir == tmp_path / "e" / "audit" / "gw1", "each node its own audit chain"
    members = {"database": {"url": "mysql://root@10.0.0.1:3306,10.0.0.2,[fd00::3]:3307/dmg"}}
    s = minimal_settings(tmp_path, pki_dir, cert, key, cluster={"node": "gw1"}, **members)
    assert MysqlTarget.parse(s.database_url).members == (
        ("10.0.0.1", 3306),
        ("10.0.0.2", 3306),
        ("fd00::3", 3307),
    ), "the Galera members, the node's own first"
    with pytest.raises(ConfigError) as err:
        minimal_settings(
            tmp_path, pki_dir, cert, key, database={"url": "mysql://root@10.0.0.1:3306,db2:x/dmg"}
        )
    assert err.value.key == "database.url" and "'db2:x' is not host:port" in str(err.value)
    alone = minimal_settings(tmp_path, pki_dir, cert, key)
    assert alone.cluster is None and alone.node == "" and alone.audit_dir == tmp_path / "e" / "audit"


@pytest.mark.asyncio
async def test_status_page_and_check_mk_show_each_node_and_a_dead_one(tmp_path: Path) -> None:
    from gateway import clusterview
    from gateway.monitoring import CRIT, OK, WARN
    from gateway.status import Status

    catalog = await open_catalog(f"sqlite:///{tmp_path / 'c.sqlite'}")
    outbox = Spool(tmp_path / "d" / "spool" / "outbox", tmp_path / "d" / "tmp")
    outbox.prepare()
    try:
        a, b = _cluster(catalog, "a", outbox), _cluster(catalog, "b", outbox)
        a.counters = lambda: {"sent_mails": 7, "ingested_mails": 2, "catalog_member": "10.0.0.2:3306"}
        await a.start()
        await b.start()
        now = time.time()
        view = Status(now, "gateway-a", "GW_A", "mysql", None)
        view.cluster = await cluster_view(catalog, 30, now)
        view.cluster["galera"] = {"cluster_status": "Primary", "cluster_size": "3"}
        text = "\n".join(clusterview.text(view))
        assert "node a" in text and "up" in text and "sent 7 ingested 2" in text and "runs backup" in text
        assert "catalog on 10.0.0.2:3306" in text, "which Galera member the node uses (its own may be down)"
        assert "<td>10.0.0.2:3306</td>" in "".join(clusterview.html(view))
        states = {s.name: s.state for s in clusterview.services(view)}
        assert states == {"DMG Cluster": OK, "DMG Cluster node a": OK, "DMG Cluster node b": OK}

        # 40 s later a has not beaten (it died); b has; one Galera member is gone
        later = now + 40
        await catalog.heartbeat("b", "host", 2, now, later, 30, {})
        view = Status(later, "gateway-a", "GW_A", "mysql", None)
        view.cluster = await cluster_view(catalog, 30, later)
        view.cluster["galera"] = {"cluster_status": "Primary", "cluster_size": "2"}
        states = {s.name: s.state for s in clusterview.services(view)}
        assert states["DMG Cluster node a"] == CRIT and states["DMG Cluster node b"] == OK
        assert states["DMG Cluster"] == CRIT, "a's roles run nowhere until b takes them"
        assert "DOWN" in "\n".join(clusterview.text(view)) and "DOWN" in "".join(clusterview.html(view))
        await b.take("role", "backup")  # what b's next beat does for every role
        for role in ROLES:
            await catalog.take_claim("role", role, "b", later, 30)
        view.cluster = await cluster_view(catalog, 30, later)
        view.cluster["galera"] = {"cluster_status": "Primary", "cluster_size": "2"}
        assert {s.name: s.state for s in clusterview.services(view)}["DMG Cluster"] == WARN, (
            "two of three members"
        )
    finally:
        await catalog.close()


def test_a_node_removed_for_good_is_forgotten_by_the_cli_and_an_alive_one_is_not(  # type: ignore[no-untyped-def]
    tmp_path: Path, pki_dir: Path, mariadb_url: str, capsys
) -> None:
    """`cluster forget NODE`: a node that is gone for good leaves status and check_mk (which showed it DOWN, CRIT,
    for ever); a node that is alive, holds its lock on D:, or left journals nobody indexed yet, is kept."""
    from gateway import cli
    from gateway.devtools.devenv import cluster_table
    from gateway.volume import hold_volume
    from tests.conftest import write_config

    cfg = write_config(tmp_path, pki_dir, cluster_table("a", 30), database_url=mariadb_url)
    d = tmp_path / "d"

    async def nodes_and_claims(beats: dict[str, float]) -> tuple[list[str], int]:
        catalog = await open_catalog(mariadb_url)
        try:
            for node, when in beats.items():
                await catalog.heartbeat(node, "host", 1, when, when, 30, {})
                await catalog.take_claim(SEND, f"mail-of-{node}", node, when, 30)
            names = [str(n["node"]) for n in await catalog.cluster_nodes()]
            return names, len(await catalog.claims())
        finally:
            await catalog.close()

    now = time.time()
    assert asyncio.run(nodes_and_claims({"a": now, "b": now - 3600, "c": now - 5})) == (["a", "b", "c"], 3)

    def forget(node: str) -> tuple[int, str]:
        code = cli.main(["cluster", "-c", str(cfg), "forget", node])
        out = capsys.readouterr()
        return code, out.out + out.err

    code, said = forget("c")
    assert code == 1 and "node c is alive (heartbeat 5 s ago)" in said
    code, said = forget("x")
    assert code == 1 and "no node 'x' in the cluster (nodes: a, b, c)" in said

    journal = d / "nodes" / "b" / "intake" / "journal-0-1.jsonl"
    journal.parent.mkdir(parents=True)
    journal.write_text("{}\n")
    code, said = forget("b")
    assert code == 1 and "left 1 intake journals that no running node has indexed yet" in said
    journal.unlink()
    fd = hold_volume(d, "b")  # a process of node b is still running (its heartbeat stopped: a hung catalog)
    try:
        code, said = forget("b")
        assert code == 1 and "still holds node b's lock on D:" in said
    finally:
        os.close(fd)

    code, said = forget("b")
    assert code == 0 and "node b forgotten (1 lapsed claims dropped)" in said
    assert asyncio.run(nodes_and_claims({})) == (["a", "c"], 2), "b's row and claim are gone, nobody else's"
    code, said = forget("b")
    assert code == 1 and "no node 'b'" in said


@pytest.mark.asyncio
async def test_a_mail_a_dead_node_sent_but_never_recorded_is_recorded_and_audited_by_another(
    pair_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Node x dies after the mail server took a transfer's last mail and its queue said so, before the catalog
    heard of it; x never comes back. Node y finds x's lapsed claim on an item no longer active and brings the
    catalog in line with the queues: the mail and its transfer are sent, with their event, once."""
    from gateway.core.states import TransferState
    from gateway.devtools.studies import make_study
    from gateway.reconcile import catalog_from_queues

    pair = await pair_factory()
    a = pair.a
    make_study(tmp_path / "study", ct=2, mr=0, sc=0, size=16)
    listed, item = await pair.a_packages(tmp_path / "study")
    x, y = _cluster(a.catalog, "x", a.outbox, lease=0.4), _cluster(a.catalog, "y", a.outbox, lease=0.4)
    await x.start()
    claimed = await x.take_item(a.outbox, SEND, item)
    assert claimed is not None
    a.outbox.move(
        a.outbox.move(claimed, QueueState.ACTIVE), QueueState.DONE, drop_content=True
    )  # then x dies
    y.finish = lambda: catalog_from_queues(a.outbox, a.inbox, a.catalog, a.ctx.audit)
    mail = str(item.meta["message_id"])
    await y.start()
    assert await a.catalog.mail_state(mail) == "queued", "x's lease runs: its work stays with it"
    deadline = time.monotonic() + 10
    while await a.catalog.mail_state(mail) == "queued" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # x beats no more; its lease runs out
        await y.beat()
    assert await a.catalog.mail_state(mail) == "sent"
    assert await a.catalog.transfers_in_state("out", TransferState.SENT)
    trail = a.ctx.audit.trail

    def sent_events() -> list[str]:
        return [
            r.key for d in trail.days() for r in trail.records(d) if r.key.startswith(f"out:{listed['id']}")
        ]

    assert len(sent_events()) == 1
    await y.beat()
    assert len(sent_events()) == 1 and await a.catalog.claims(SEND) == [], "the claim is gone: done once"


@pytest.mark.asyncio
async def test_a_claim_the_catalog_failed_to_give_back_is_given_back_by_the_next_beat(tmp_path: Path) -> None:
    """A Galera member dies under a release (or under a take whose commit went through and whose answer was
    lost): the node's heartbeat would renew that claim for ever, and nobody, the node included, would ever
    work on the mail again. The next beat gives it back."""
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    cat_a, cat_b = await open_catalog(url), await open_catalog(url)
    outbox = Spool(tmp_path / "d" / "spool" / "outbox", tmp_path / "d" / "tmp")
    outbox.prepare()
    (tmp_path / "d" / "tmp").mkdir(parents=True)
    real_release, real_take = cat_a.release_claim, cat_a.take_claim

    async def member_died(*_: object) -> bool:  # the injected fault: the connection went with the member
        raise ConnectionResetError("member gone")

    async def answer_lost(*args: object) -> int | None:
        await real_take(*args)  # type: ignore[arg-type]
        raise ConnectionResetError("member gone after the commit")

    try:
        a, b = _cluster(cat_a, "a", outbox), _cluster(cat_b, "b", outbox)
        await a.start()
        await b.start()
        m1 = outbox.put("t1.00001", b"mail", {"message_id": "<1@x>"})
        m2 = outbox.put("t2.00001", b"mail", {"message_id": "<2@x>"})
        assert await a.take_item(outbox, SEND, m1) is not None
        cat_a.release_claim = member_died  # type: ignore[method-assign]
        await a.release(SEND, m1.id)  # the mail was deferred; its claim could not be given back
        cat_a.release_claim, cat_a.take_claim = real_release, answer_lost  # type: ignore[method-assign]
        with pytest.raises(ConnectionResetError):
            await a.take_item(outbox, SEND, m2)
        cat_a.take_claim = real_take  # type: ignore[method-assign]
        for item in (m1, m2):
            assert await a.take_item(outbox, SEND, item) is None, "still a's in the catalog"
            assert await b.take_item(outbox, SEND, item) is None
        await a.beat()
        assert await a.catalog.claims(SEND) == [], "given back, not renewed"
        assert (
            await b.take_item(outbox, SEND, m1) is not None
            and await a.take_item(outbox, SEND, m2) is not None
        )
    finally:
        await cat_a.close()
        await cat_b.close()
