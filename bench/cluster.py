"""The cluster's benchmark row (docs/cluster.md): inbound throughput, mails fetched, opened and ingested per second,
with one gateway node and with two on the three-member Galera test cluster, sharing one D:.

Gateway A (alone) sends a study as many small mails to B's mailbox on the real mail cluster while B is stopped;
then B's node(s) start and the clock runs from the first mail fetched to the last one ingested (the catalog's
timestamps). Run by `bench/run --only cluster`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pymysql

from gateway.devtools.devenv import cluster_table, gateway_process
from gateway.devtools.galera import GaleraCluster
from gateway.devtools.mailcluster import MailCluster
from gateway.devtools.process import GatewayProcess
from gateway.devtools.studies import make_ct_study

ROOT = Path(__file__).resolve().parents[1]
PKI = ROOT / "certs" / "dev"


def _gateway(work: Path, site: str, node: str, partner: tuple[str, str, str], **kw: object) -> GatewayProcess:
    return gateway_process(
        work / node,
        site,
        PKI,
        [partner],
        d_root=work / f"{site}-d",
        e_root=work / f"{site}-e",
        stability_delay=1,
        poll_interval=0.5,
        max_mail_size="1MB",
        **kw,
    )


def _fill_mailbox(work: Path, study: Path) -> int:
    """Gateway A sends the study to B's mailbox (B not running); how many mails it sent."""
    import subprocess

    a = _gateway(work, "gateway-a", "a", ("gateway-b", "gateway-b", "TO_B"))
    a.start()
    try:
        subprocess.run(
            ["storescu", "-aec", "TO_B", "127.0.0.1", str(a.port), "+sd", str(study)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        deadline = time.monotonic() + 900
        with sqlite3.connect(a.d_root / "catalog.sqlite") as db:
            while time.monotonic() < deadline:
                (sent,) = db.execute(
                    "SELECT COUNT(*) FROM transfers WHERE direction='out' AND state='sent'"
                ).fetchone()
                if sent:
                    (mails,) = db.execute("SELECT COUNT(*) FROM mails WHERE direction='out'").fetchone()
                    return int(mails)
                time.sleep(1)
        raise RuntimeError("gateway A did not send the study")
    finally:
        a.stop()


def _ingest_rate(galera: GaleraCluster, db: str, mails: int, timeout: float = 1200) -> float:
    """Mails per second from the first fetched to the last ingested, once all are ingested."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = galera.connect(1)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"SELECT COUNT(*), MIN(created_at), MAX(updated_at) FROM `{db}`.mails "
                    "WHERE direction = 'in' AND state = 'ingested'"
                )
                count, first, last = cur.fetchone()
        except pymysql.err.ProgrammingError:  # the schema is not there yet
            count = 0
        finally:
            conn.close()
        if count >= mails:
            return float(count) / max(1e-3, float(last) - float(first))
        time.sleep(1)
    raise RuntimeError(f"B did not ingest {mails} mails within {timeout:.0f} s")


def bench_cluster(base: Path, images: int = 240) -> dict[str, float]:
    """Inbound mails per second with one B node and with two (same machine, same mails' size)."""
    mail = MailCluster(ROOT / ".dev" / "mailcluster")
    mail.up(PKI, ["gateway-a", "gateway-b"])
    mail.drain()
    galera = GaleraCluster(ROOT / ".dev" / "galera")
    started = galera.ensure_up()
    results: dict[str, float] = {}
    try:
        for count in (1, 2):
            work = base / f"cluster-{count}"
            study = work / "study"
            make_ct_study(study, count=images, size=512, seed=10 + count)
            mails = _fill_mailbox(work, study)
            db = galera.create_database("dmg_bench")
            nodes = [
                _gateway(
                    work,
                    "gateway-b",
                    f"b{n}",
                    ("gateway-a", "gateway-a", "TO_A"),
                    database_url=galera.url(n, db),
                    tail=cluster_table(f"b{n}", 30),
                )
                for n in range(1, count + 1)
            ]
            starting = [threading.Thread(target=node.start, args=(120,)) for node in nodes]
            for thread in starting:  # together: the second node is not a few seconds late to the work
                thread.start()
            for thread in starting:
                thread.join()
            try:
                rate = _ingest_rate(galera, db, mails)
            finally:
                for node in nodes:
                    node.stop()
            results[f"cluster_inbound_mails_per_s_{count}_node{'s' if count > 1 else ''}"] = round(rate, 2)
            results[f"cluster_inbound_mails_{count}"] = mails
            print(f"cluster: {count} node(s) of B ingested {mails} mails at {rate:.2f} mails/s", flush=True)
            mail.drain()
        one, two = (
            results["cluster_inbound_mails_per_s_1_node"],
            results["cluster_inbound_mails_per_s_2_nodes"],
        )
        results["cluster_inbound_2_vs_1"] = round(two / one, 2)
    finally:
        if started:
            galera.down()
    return results
