"""Two gateway nodes per site on the Galera test cluster (docs/cluster.md), through the real mail cluster:

    A1 (member 1) ┐ shared D: ──mail──▶ mailbox ──POP3S──▶ B1 (member 2) ┐ shared D:
    A2 (member 2) ┘ one catalog                              B2 (member 3) ┘ one catalog

Any node takes DICOM; one node of a site runs each singleton stage (routing, packaging, fetch, ...), both send
and ingest; the claims decide who works on what. A node SIGKILLed in the middle of a study's transfer, and a Galera
member stopped under another node: the survivors finish the work after the lease, every instance arrives exactly
once, and the nodes rejoin when they come back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from gateway.devtools.devenv import cluster_table, gateway_process
from gateway.devtools.galera import GaleraCluster
from gateway.devtools.process import GatewayProcess
from gateway.devtools.studies import make_study
from tests.conftest import CANARIES, ROOT, storescu, wait_for

LEASE = 10  # seconds: short, so that take-over happens within the test's patience; longer than a Galera
# member's stall while a dead peer is evicted (about 5 s)


def _node(
    tmp_path: Path, pki_dir: Path, site: str, node: str, url: str, partners: list[tuple[str, str, str]]
) -> GatewayProcess:
    return gateway_process(
        tmp_path / node,
        site,
        pki_dir,
        partners,
        d_root=tmp_path / f"{site}-d",  # one D: and E: for the site's nodes
        e_root=tmp_path / f"{site}-e",
        database_url=url,
        stability_delay=2,
        poll_interval=1,
        max_mail_size="1MB",
        tail=cluster_table(node, LEASE),
    )


def _status(gw: GatewayProcess) -> dict:  # type: ignore[type-arg]
    return json.loads(gw.cli("status", "--json"))


def _complete(gw: GatewayProcess, direction: str) -> int:
    return len(
        [t for t in _status(gw)["transfers"] if t["direction"] == direction and t["state"] == "complete"]
    )


def _sent(gw: GatewayProcess) -> int:
    return len([t for t in _status(gw)["transfers"] if t["direction"] == "out" and t["state"] == "sent"])


def _role_holder(gw: GatewayProcess, role: str) -> str:
    nodes = _status(gw)["cluster"]["nodes"]
    return next((n["node"] for n in nodes if role in n["roles"]), "")


def test_two_nodes_per_site_send_and_ingest_once_and_fail_over(  # type: ignore[no-untyped-def]
    galera: GaleraCluster, mail, pki_dir: Path, tmp_path: Path
) -> None:
    db_a, db_b = galera.create_database("dmg_cluster"), galera.create_database("dmg_cluster")
    a1 = _node(
        tmp_path, pki_dir, "gateway-a", "a1", galera.url(1, db_a), [("gateway-b", "gateway-b", "TO_B")]
    )
    a2 = _node(
        tmp_path, pki_dir, "gateway-a", "a2", galera.url(2, db_a), [("gateway-b", "gateway-b", "TO_B")]
    )
    b1 = _node(
        tmp_path, pki_dir, "gateway-b", "b1", galera.url(2, db_b), [("gateway-a", "gateway-a", "TO_A")]
    )
    b2 = _node(
        tmp_path, pki_dir, "gateway-b", "b2", galera.url(3, db_b), [("gateway-a", "gateway-a", "TO_A")]
    )
    nodes = [a1, a2, b1, b2]
    try:
        for gw in nodes:
            gw.start(60)

        # each site: both nodes up, every singleton stage on exactly one of them
        def both_up() -> dict | None:  # type: ignore[type-arg]
            cluster = _status(a2)["cluster"]
            return cluster if len([n for n in cluster["nodes"] if n["alive"]]) == 2 else None

        view = wait_for(both_up, 30, 0.5, "both of A's nodes in A's status")
        assert view["galera"]["cluster_size"] == "3" and view["galera"]["cluster_status"] == "Primary"
        roles = [r for n in view["nodes"] for r in n["roles"]]
        assert sorted(roles) == sorted(set(roles)) and not view["unheld_roles"], "each role on one node"

        # 1. a study into the node that runs no stage: it is packaged and sent by the site, ingested once at B
        first = make_study(tmp_path / "s1", ct=6, mr=4, sc=2)
        idle = a2 if _role_holder(a1, "package") == "a1" else a1
        assert storescu(idle.port, "TO_B", tmp_path / "s1").returncode == 0
        wait_for(lambda: _complete(b1, "in") == 1, 180, 1, "study 1 complete at B")

        # 2. a study into the node that packages it, killed as soon as its mails begin to leave: the other node
        # takes its roles and its claimed mails after the lease and finishes; B2's Galera member is stopped
        # meanwhile, so B1 alone fetches and ingests
        busy = a1 if idle is a2 else a2
        survivor = idle
        second = make_study(tmp_path / "s2", ct=20, mr=10, sc=4)
        assert storescu(busy.port, "TO_B", tmp_path / "s2").returncode == 0
        # study 2's first mails on their way (or, on a fast machine, all of them: then the kill tests the roles'
        # take-over only)
        wait_for(
            lambda: (
                len(
                    [t for t in _status(survivor)["transfers"] if t["direction"] == "out" and t["parts_done"]]
                )
                >= 2
            ),
            120,
            0.2,
            "study 2's first mails to be sent",
        )
        busy.kill()
        galera.stop_member(3)
        wait_for(lambda: _sent(survivor) == 2, 240, 1, "the surviving node to finish study 2's transfer")
        wait_for(lambda: _complete(b1, "in") == 2, 240, 1, "study 2 complete at B")

        def taken_over() -> dict | None:  # type: ignore[type-arg]
            cluster = _status(survivor)["cluster"]
            alive = {n["node"]: n["alive"] for n in cluster["nodes"]}
            down = alive == {survivor.name: True, busy.name: False}
            return cluster if down and not cluster["unheld_roles"] else None

        st = wait_for(taken_over, 3 * LEASE, 0.5, "the killed node down and its stages on the survivor")
        assert sorted(n["node"] for n in st["nodes"] if n["roles"]) == [survivor.name]

        # exactly once at B: every instance of both studies, one inbound transfer each
        inbound = _status(b1)
        assert sum(s["instances"] for s in inbound["studies"]) == len(first) + len(second)
        assert len([t for t in inbound["transfers"] if t["direction"] == "in"]) == 2

        # both come back and rejoin
        galera.start_member(3)
        busy.start(60)
        wait_for(
            lambda: (
                all(n["alive"] for n in _status(b2)["cluster"]["nodes"])
                and len(_status(survivor)["cluster"]["nodes"]) == 2
                and all(n["alive"] for n in _status(survivor)["cluster"]["nodes"])
            ),
            90,
            1,
            "every node up again",
        )
        text = survivor.cli("status")
        assert "node a1" in text and "node a2" in text and "DOWN" not in text
        checks = survivor.cli("check-mk")
        assert "DMG Cluster" in checks and "DMG Cluster node a1" in checks
        for gw in nodes:
            log = gw.log.read_bytes()
            for canary in CANARIES:
                assert canary not in log, f"patient data in {gw.name}'s log"
    finally:
        for gw in nodes:
            gw.stop()
        if galera.size(1) < 3:
            galera.start_member(3)


def test_a_node_goes_on_on_the_next_member_when_its_own_dies(  # type: ignore[no-untyped-def]
    galera: GaleraCluster, mail, pki_dir: Path, tmp_path: Path
) -> None:
    """A node whose `[database] url` lists the members (its own first) keeps working when its own member dies:
    DICOM is taken, the study leaves, and `status` says which member the node now uses."""
    db = galera.create_database("dmg_member")
    a1 = _node(
        tmp_path, pki_dir, "gateway-a", "a1", galera.url(3, db, 2), [("gateway-b", "gateway-b", "TO_B")]
    )
    b = gateway_process(
        tmp_path / "b", "gateway-b", pki_dir, [("gateway-a", "gateway-a", "TO_A")], poll_interval=1
    )

    def member_of_a1() -> str:
        nodes = _status(a1)["cluster"]["nodes"]
        return next(
            n["counters"].get("catalog_member", "") for n in nodes if n["node"] == "a1" and n["alive"]
        )

    try:
        a1.start(60)
        b.start(60)
        assert wait_for(member_of_a1, 30, 0.5, "a1's first heartbeat") == "127.0.0.1:3309"
        galera.stop_member(3, kill=True)
        study = make_study(tmp_path / "s", ct=4, mr=2, sc=1)
        assert storescu(a1.port, "TO_B", tmp_path / "s").returncode == 0
        wait_for(lambda: _complete(b, "in") == 1, 180, 1, "the study complete at B")
        assert sum(s["instances"] for s in _status(b)["studies"]) == len(study)
        wait_for(lambda: member_of_a1() == "127.0.0.1:3308", 30, 0.5, "a1's status naming member 2")
        log = a1.log.read_text()
        assert "catalog: now on member 127.0.0.1:3308 (was 127.0.0.1:3309)" in log
        assert "closing the DICOM port" not in log, "the node never lost the catalog for long"
        assert "catalog on 127.0.0.1:3308" in a1.cli("status")
    finally:
        a1.stop()
        b.stop()
        if galera.state(3) is None:
            galera.start_member(3)


def test_a_node_without_its_catalog_closes_its_dicom_port_for_the_virtual_ip_and_opens_it_again(  # type: ignore[no-untyped-def]
    galera: GaleraCluster, mail, pki_dir: Path, tmp_path: Path
) -> None:
    """A node whose only Galera member is gone (a minority, as keepalived's check sees it): after `minority_grace`
    it closes its DICOM port, so that `contrib/keepalived/dmg-check` fails and the virtual IP moves to a node that
    can work; when the member is back the port opens again and takes studies."""
    db = galera.create_database("dmg_minority")
    a1 = _node(tmp_path, pki_dir, "gateway-a", "a1", galera.url(3, db), [("gateway-b", "gateway-b", "TO_B")])

    def check() -> int:
        script = ROOT / "contrib" / "keepalived" / "dmg-check"
        return subprocess.run(
            [str(script), "127.0.0.1", str(a1.port), "GATEWAY_A"], capture_output=True, timeout=60
        ).returncode

    try:
        a1.start(60)
        assert check() == 0, "a healthy node answers keepalived's C-ECHO"
        galera.stop_member(3, kill=True)
        # the lease lapses (roles stop), then minority_grace (2 × lease) passes without the catalog
        wait_for(lambda: check() != 0, 6 * LEASE + 60, 1, "the DICOM port closed")
        assert "cluster: catalog unreachable: closing the DICOM port" in a1.log.read_text()
        galera.start_member(3)
        wait_for(lambda: check() == 0, 180, 1, "the DICOM port open again")
        assert "cluster: catalog back" in a1.log.read_text()
        study = make_study(tmp_path / "s", ct=2, mr=1, sc=0)
        assert storescu(a1.port, "TO_B", tmp_path / "s").returncode == 0, "studies are taken again"
        wait_for(
            lambda: sum(s["instances"] for s in _status(a1)["studies"]) == len(study),
            60,
            0.5,
            "the study indexed in the catalog",
        )
    finally:
        a1.stop()
        if galera.state(3) is None:
            galera.start_member(3)
