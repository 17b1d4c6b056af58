"""Kill test: two gateways exchange a stream of studies through the real mail cluster while a driver SIGKILLs one of
them at random moments and restarts it. Afterwards every SOP instance acknowledged to the modality must be in B's
storage exactly once, byte-identical.

    bench/killtest --kills 30 [--seed N] [--mariadb]
    bench/killtest --cluster --kills 30     two nodes per gateway on the three-member Galera test cluster (one D:
                                            per gateway, docs/cluster.md); the driver SIGKILLs gateway nodes and
                                            Galera members at random; the modality sends to whichever A node is up

Before it: audit_missing=M audit_unmarked_twice=T audit_miscounted=C (the audit trail's form: both gateways report
to a real rsyslog over TLS; see `audit_check`).
Last line: kills=K acknowledged=A delivered=D lost=L duplicates=U
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import load  # noqa: E402
from gateway.core.dicominfo import dataset_offset, read_info  # noqa: E402
from gateway.devtools import pki  # noqa: E402
from gateway.devtools.auditrepo import AuditRepository  # noqa: E402
from gateway.devtools.devenv import cluster_table, gateway_process  # noqa: E402
from gateway.devtools.galera import GaleraCluster  # noqa: E402
from gateway.devtools.mailcluster import MailCluster  # noqa: E402
from gateway.devtools.process import GatewayProcess  # noqa: E402
from gateway.devtools.studies import make_study  # noqa: E402
from gateway.storage import Storage  # noqa: E402

_SENDING = re.compile(r"Sending file: (\S+)")
_SUCCESS = re.compile(r"Received Store Response \(Success\)")


def send_study(port: int, folder: Path) -> list[Path]:
    """storescu the folder; return the files the gateway acknowledged with Success."""
    r = subprocess.run(
        [
            "storescu",
            "-v",
            "-xr",
            "-aet",
            "MODALITY",
            "-aec",
            "TO_B",
            "-to",
            "10",
            "-ta",
            "10",
            "-td",
            "10",
            "127.0.0.1",
            str(port),
            "+sd",
            str(folder),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=120,
    )
    acked: list[Path] = []
    current: Path | None = None
    for line in (r.stdout + r.stderr).splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1))
        elif _SUCCESS.search(line) and current is not None:
            acked.append(current)
            current = None
    return acked


def _tail(log: Path, lines: int = 60) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def helper_processes() -> set[int]:
    """PIDs of the helpers a gateway starts: multiprocessing's (forkserver, its workers, resource tracker), GnuPG's."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            program = Path(cmdline.split(b"\0")[0].decode(errors="replace")).name
            if b"from multiprocessing." in cmdline or program in ("gpg", "gpg-agent"):
                found.add(int(entry.name))
    return found


def _events(repo: AuditRepository, app: str) -> list[tuple[bool, str, str, dict[str, int]]]:
    """The repository's messages from one gateway, one per record of its chain (a record sent again, marked
    `resent`, counts once): (replayed after a crash, event, description, study → instances)."""
    from xml.etree import ElementTree as ET

    seen: dict[int, tuple[bool, str, str, dict[str, int]]] = {}
    for name, seq, _resent, replay, xml in repo.marked():
        if name != app or seq in seen:
            continue
        root = ET.fromstring(xml)
        event = root.find("EventIdentification/EventID")
        studies: dict[str, int] = {}
        text = ""
        for o in root.findall("ParticipantObjectIdentification"):
            if o.get("ParticipantObjectTypeCodeRole") == "3":
                name = o.find("ParticipantObjectName")  # what happened to the study, in words
                text = (name.text or "") if name is not None else ""
                counts = [int(c.get("NumberOfInstances", "0")) for c in o.iter("SOPClass")]
                studies[o.get("ParticipantObjectID", "")] = sum(counts)
        seen[seq] = (replay, event.get("originalText", "") if event is not None else "", text, studies)
    return list(seen.values())


def audit_check(
    repo: AuditRepository, procs: dict[str, GatewayProcess], indexed: dict[str, dict[str, int]], settle: float
) -> dict[str, int]:
    """The audit form of the kill test. Every record of each gateway's local chain reached the repository; a
    record that arrived twice carries the `resent` mark; and for every study each gateway indexed, the instances
    its events count (received over DICOM at A, sent by mail at A, received by mail at B) cover every instance
    its catalog holds, and the events not marked as replayed after a crash count none twice (a replayed one may repeat an
    earlier event: that is what the mark says)."""
    from gateway.audit import AuditTrail

    trails = {n: AuditTrail(load(p.config).e_root / "audit", n) for n, p in procs.items()}

    def local(name: str) -> set[int]:
        t = trails[name]
        return {r.seq for d in t.days() for r in t.records(d)}

    def missing() -> int:
        got = {(app, seq) for app, seq, _, _ in repo.messages()}
        return sum(len({(n, q) for q in local(n)} - got) for n in procs)

    end = time.monotonic() + settle
    while missing() and time.monotonic() < end:
        time.sleep(1)
    unmarked: dict[tuple[str, int], int] = {}
    for app, seq, resent, _ in repo.messages():
        if not resent:
            unmarked[(app, seq)] = unmarked.get((app, seq), 0) + 1
    counts = {"audit_missing": missing(), "audit_unmarked_twice": sum(n > 1 for n in unmarked.values())}
    wrong = 0
    for app, what, at_side in (
        ("gateway-a", "received over DICOM", "gateway-a"),
        ("gateway-a", "sent by mail to partner", "gateway-b"),
        ("gateway-b", "received by mail from partner", "gateway-b"),
    ):
        told: dict[str, int] = {}  # instances counted by events not marked as replayed
        again: dict[str, int] = {}  # ... by events written again after a crash (marked)
        for replay, event, text, studies in _events(repo, app):
            if event == "DICOM Instances Transferred" and text.startswith(what):
                into = again if replay else told
                for study, n in studies.items():
                    into[study] = into.get(study, 0) + n
        for study, n in indexed[at_side].items():
            plain, marked = told.get(study, 0), again.get(study, 0)
            if not plain <= n <= plain + marked:  # none missing; unmarked, none twice
                wrong += 1
                if wrong <= 20:
                    print(
                        f"audit: {app} '{what}': {plain} + {marked} replayed of {n} in {study}",
                        file=sys.stderr,
                    )
    counts["audit_miscounted"] = wrong
    return counts


def indexed_per_study(config: Path, source: str) -> dict[str, int]:
    """Study Instance UID → instances the gateway's catalog holds from `source` ("dicom": a modality, "mail": a
    partner). The catalog, not the files: a file stored in the moment of a kill, before its journal line, was never
    acknowledged nor indexed, and no event is owed for it."""
    import asyncio

    from gateway.catalog import open_catalog

    async def read() -> dict[str, int]:
        catalog = await open_catalog(load(config).database_url)
        try:
            rows = await catalog.db.fetchall(
                "SELECT study_uid, COUNT(*) FROM instances WHERE source = ? GROUP BY study_uid", (source,)
            )
        finally:
            await catalog.close()
        return {str(study): int(n) for study, n in rows}

    return asyncio.run(read())


LEASE = 12  # the cluster form's lease (seconds): longer than a Galera member's stall while a dead peer is evicted (~5 s)


def _site(proc: GatewayProcess) -> str:
    return "gateway-a" if proc.name.startswith(("gateway-a", "a")) else "gateway-b"


def _gateways(
    a: argparse.Namespace,
    work: Path,
    pki_dir: Path,
    repo: AuditRepository,
    db_name: str,
    galera: GaleraCluster | None,
) -> dict[str, GatewayProcess]:
    """The gateways, not yet started: A and B; or in the cluster form nodes a1, a2 (preferring Galera members 1 and
    2, one D:) and b1, b2 (members 2 and 3, one D:), each with every member in its URL (a member's death moves the
    node's catalog to the next)."""
    procs: dict[str, GatewayProcess] = {}
    layout = (
        [("gateway-a", "a1", 1), ("gateway-a", "a2", 2), ("gateway-b", "b1", 2), ("gateway-b", "b2", 3)]
        if galera is not None
        else [("gateway-a", "gateway-a", 0), ("gateway-b", "gateway-b", 0)]
    )
    for site, node, member in layout:
        partner = (
            ("gateway-b", "gateway-b", "TO_B") if site == "gateway-a" else ("gateway-a", "gateway-a", "TO_A")
        )
        extra: dict[str, str] = {}
        tail = f'[audit]\nrepository = "127.0.0.1:{repo.port}"\napp_name = "{node}"\n'
        if galera is not None:
            others = [m for m in (1, 2, 3) if m != member]  # the node's own member first, then the others
            extra = {"database_url": galera.url(member, f"{db_name}_{site[-1]}", *others)}
            tail += cluster_table(node, LEASE)
        elif a.mariadb and site == "gateway-a":
            extra = {"database_url": f"mysql://root@127.0.0.1:3306/{db_name}"}
        procs[node] = gateway_process(
            work / node,
            site,
            pki_dir,
            [partner],
            d_root=work / site / "d",
            e_root=work / site / "e",
            stability_delay=1,
            poll_interval=0.5,
            max_mail_size="256KB",
            node_cooldown=2,
            tail=tail,
            **extra,
        )
    return procs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mariadb", action="store_true", help="gateway A on MariaDB (127.0.0.1:3306, root)")
    ap.add_argument(
        "--settle",
        type=float,
        default=300,
        help="seconds to wait for the next delivery after the last kill (the wait goes on while deliveries do)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="two nodes per gateway on the Galera test cluster (docs/cluster.md)",
    )
    ap.add_argument(
        "--start-timeout",
        type=float,
        default=120,
        help="seconds a restarted gateway may take to open its port",
    )
    a = ap.parse_args(argv)
    rnd = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="killtest-"))
    pki_dir = ROOT / "certs" / "dev"
    pki.make_dev_pki(pki_dir, ["gateway-a", "gateway-b"])
    cluster = MailCluster(ROOT / ".dev" / "mailcluster")
    cluster.up(pki_dir, ["gateway-a", "gateway-b"])
    cluster.drain()

    repo = AuditRepository(work / "audit-repository", pki_dir)  # rsyslog over TLS, client certificates
    repo.start()
    helpers_before = helper_processes()
    db_name = f"dmg_killtest_{os.getpid()}"
    galera = GaleraCluster(ROOT / ".dev" / "galera") if a.cluster else None
    started_galera = galera is not None and galera.ensure_up()
    procs = _gateways(a, work, pki_dir, repo, db_name, galera)

    def leave_nothing_running() -> None:
        """However the driver ends (an error, SIGTERM from a test that gave up), its gateways and the repository end
        too: a gateway left running would take the next run's mail out of the shared mailboxes."""
        for proc in procs.values():
            proc.kill()
        repo.stop()

    atexit.register(leave_nothing_running)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that atexit runs
    for proc in procs.values():
        proc.start(a.start_timeout)
    sites = {site: [p for p in procs.values() if _site(p) == site] for site in ("gateway-a", "gateway-b")}

    acknowledged: dict[str, Path] = {}  # SOP Instance UID → source file
    kills = 0
    restarts: list[float] = []  # seconds from start to an open DICOM port, per restart
    failed_restart = ""
    stop = threading.Event()

    member_kills = 0  # of them, Galera members (the cluster form)

    def killer() -> None:
        nonlocal kills, failed_restart, member_kills
        while kills < a.kills and not stop.is_set():
            time.sleep(rnd.uniform(0.3, 2.5))
            choice = rnd.choice([*procs, *(["galera-1", "galera-2", "galera-3"] if galera else [])])
            if galera is not None and choice.startswith("galera-"):
                member = int(choice[-1])
                galera.stop_member(member, kill=True)  # one member at a time: the other two keep the quorum
                kills += 1
                member_kills += 1
                time.sleep(rnd.uniform(0.0, 2.0))
                try:
                    galera.start_member(member)
                except RuntimeError as exc:
                    failed_restart = f"{choice} after kill {kills}: {exc}"
                    return
                continue
            victim = procs[choice]
            victim.kill()
            kills += 1
            time.sleep(rnd.uniform(0.0, 0.5))
            began = time.monotonic()
            try:
                victim.start(timeout=a.start_timeout)
            except RuntimeError as exc:
                failed_restart = f"{victim.name} after kill {kills}: {exc}"
                print(f"--- {victim.name}'s log (end) ---\n{_tail(victim.log)}", file=sys.stderr, flush=True)
                print(f"restart failed: {failed_restart}", file=sys.stderr, flush=True)
                return
            restarts.append(time.monotonic() - began)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    study_no = 0
    # bounded, but never what limits the kills: a loaded machine restarts a gateway or rejoins a Galera member in
    # several seconds (15 s a kill was too few on CI: 29 of 30 kills in the time)
    deadline = time.monotonic() + 60 + a.kills * 40
    while thread.is_alive() and time.monotonic() < deadline:
        study_no += 1
        folder = work / "studies" / f"s{study_no:04d}"
        make_study(folder, ct=4, mr=3, sc=1, size=64, seed=study_no)
        # the modality sends to A (in a cluster: to either node, as through a virtual IP; the other if it is down)
        acked = []
        for a_proc in rnd.sample(sites["gateway-a"], len(sites["gateway-a"])):
            acked = send_study(a_proc.port, folder)
            if acked:
                break
        for path in acked:
            acknowledged[read_info(path).sop_instance_uid] = path
        if not acked:
            time.sleep(0.3)  # A is down right now: a modality would retry a moment later
        elif galera is not None:
            time.sleep(1.0)  # a modality's pace: the cluster form tests take-over, not a backlog of hours
    stop.set()
    thread.join(30)

    # Let the pipeline drain: wait until B holds every acknowledged instance (or the settle time runs out).
    b_storage = Storage(sites["gateway-b"][0].d_root)
    a_storage = Storage(sites["gateway-a"][0].d_root)
    # The backlog left by the last kills may take a while on a loaded machine: wait as long as deliveries go on
    # (at most `--settle` seconds without a new one)
    settle_end = time.monotonic() + a.settle
    missing = dict(acknowledged)
    while missing and time.monotonic() < settle_end:
        before = len(missing)
        for sop, path in list(missing.items()):
            if b_storage.instance_path(read_info(path)).exists():
                del missing[sop]
        if len(missing) < before:
            settle_end = time.monotonic() + a.settle
        time.sleep(1)

    delivered = 0
    corrupt = 0
    for _sop, path in acknowledged.items():
        info = read_info(path)
        at_b = b_storage.instance_path(info)
        if not at_b.exists():
            continue
        data_b = at_b.read_bytes()
        sent = path.read_bytes()
        same = (
            data_b[dataset_offset(data_b) :] == sent[dataset_offset(sent) :]
            and data_b == a_storage.instance_path(info).read_bytes()
        )
        delivered += same
        corrupt += not same
    # Exactly once: one file per SOP Instance UID below images/ (files are named by it), nothing in conflicts/
    # (a second, different copy), and nothing at B that A never stored.
    b_files = [f.stem for f in b_storage.images.rglob("*.dcm")]
    a_sops = {f.stem for f in a_storage.images.rglob("*.dcm")}
    conflicts = len(list(b_storage.conflicts.glob("*.dcm")))
    unexpected = len(set(b_files) - a_sops)
    duplicates = conflicts + (len(b_files) - len(set(b_files))) + unexpected
    rows, a_rows = len(b_files), len(a_sops)
    for p in procs.values():
        p.stop()  # their last events (Application Stop) go to the repository too
    if galera is None:
        audit = audit_check(
            repo,
            procs,
            {
                "gateway-a": indexed_per_study(procs["gateway-a"].config, "dicom"),
                "gateway-b": indexed_per_study(procs["gateway-b"].config, "mail"),
            },
            min(120.0, a.settle),
        )
    else:  # the audit form runs with one node per gateway (each cluster node keeps a chain of its own)
        audit = {}
    repo.stop()
    # every crash must take its worker processes with it: count those left behind by the 30 SIGKILLs
    orphans: set[int] = set()
    for _ in range(50):
        orphans = helper_processes() - helpers_before
        if not orphans:
            break
        time.sleep(0.2)
    if a.mariadb:
        subprocess.run(
            ["mariadb", "-h127.0.0.1", "-uroot", "-e", f"DROP DATABASE IF EXISTS `{db_name}`"], check=False
        )
    if galera is not None:
        for site in sites:
            with galera.connect(1).cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{db_name}_{site[-1]}`")
        if started_galera:
            galera.down()
    for pid in sorted(orphans):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            print(f"left behind: {pid} {cmd[:200]}", file=sys.stderr)
    lost = len(acknowledged) - delivered
    print(f"work folder: {work}" if a.keep else "", file=sys.stderr)
    if not a.keep and lost == 0 and duplicates == 0:
        shutil.rmtree(work, ignore_errors=True)
    if failed_restart:
        print(f"restart failed: {failed_restart}")
    slowest = max(restarts, default=0.0)
    median = sorted(restarts)[len(restarts) // 2] if restarts else 0.0
    print(
        f"studies={study_no} corrupt={corrupt} files_at_b={rows} stored_at_a={a_rows} conflicts={conflicts} "
        f"restart_median_s={median:.1f} restart_max_s={slowest:.1f}"
        + (f" galera_member_kills={member_kills}" if galera is not None else "")
        + f" orphans={len(orphans)}"
    )
    print(" ".join(f"{k}={v}" for k, v in audit.items()) or "audit=not checked in the cluster form")
    print(
        f"kills={kills} acknowledged={len(acknowledged)} delivered={delivered} lost={lost} duplicates={duplicates}"
    )
    return 0 if lost == 0 and duplicates == 0 and not orphans and not any(audit.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
