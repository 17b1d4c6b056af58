"""`dicom-mail-gateway`: run, send, status, dev.

dicom-mail-gateway run    -c gateway.toml                 run the gateway
dicom-mail-gateway send   -c gateway.toml --to PARTNER PATH...   enqueue DICOM files or folders by hand
dicom-mail-gateway status -c gateway.toml [--json]        studies and transfers by state
dicom-mail-gateway route  -c gateway.toml --explain STUDY  which routing rules match a stored study, and why
dicom-mail-gateway resend -c gateway.toml --to PARTNER STUDY   queue a stored study for a partner again
dicom-mail-gateway audit  -c gateway.toml --patient ID | --study UID | --partner NAME [--also OTHER.toml]
                                                        the audit trail's history (several gateways: merged)
dicom-mail-gateway audit  -c gateway.toml verify [DAY]    check the audit trail's hash chain
dicom-mail-gateway cluster -c gateway.toml forget NODE    a cluster node removed for good leaves status and check_mk
dicom-mail-gateway dev                                    dev certs + local mail cluster + loopback partner, then run


Size: one function per command, each with its output.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import logging
import os
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import clusterview, config
from gateway.errors import ConfigError, VolumeInUseError
from gateway.logsetup import setup_logging
from gateway.report import outcome_text

if TYPE_CHECKING:  # the commands import what they use when they run: `--help` stays quick
    from gateway.operator import OperatorActions
    from gateway.status import Status

log = logging.getLogger("gateway")


def _load(path: str) -> config.Settings:
    try:
        return config.load(path)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(settings: config.Settings) -> int:
    """Run the gateway until it is stopped; a start-up refusal is one clear line and exit code 2."""
    from gateway import service

    try:
        asyncio.run(service.run(settings))
    except (ConfigError, VolumeInUseError) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    setup_logging(settings.log_level)
    return _serve(settings)


def _collect(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"not found: {p}")
    return files


class _Progress:
    """One self-overwriting line on a terminal (stderr), at most five times a second; nothing when not a TTY."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.on = sys.stderr.isatty()
        self.shown = 0.0

    def show(self, done: int, size: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.on or (not final and now - self.shown < 0.2):
            return
        self.shown = now
        print(
            f"\r  {done}/{self.total} files, {size / 1e6:.1f} MB", end="\n" if final else "", file=sys.stderr
        )


async def _send(settings: config.Settings, partner: str, paths: list[str]) -> int:
    """Size: `send` as a user sees it: collect, store, index and queue, with the messages for each outcome in order."""
    from gateway.catalog import InstanceRecord, open_catalog
    from gateway.core.dicominfo import NotDicomError, read_info
    from gateway.storage import DiskFullError, Storage, StoreOutcome

    target = settings.partner_by_name(partner)
    if target is None:
        print(
            f"unknown partner {partner!r}; configured: {', '.join(p.name for p in settings.partners)}",
            file=sys.stderr,
        )
        return 2
    storage = Storage(settings.d_root, settings.min_free, settings.min_free_inodes)
    # never clean tmp/ here: a running gateway's in-flight C-STORE files and staging are there. Like one of its
    # receiver processes, `send` only adds instances (each placed with link(), safe beside other writers).
    storage.prepare(clean_tmp=False)
    files = list(_collect(paths))
    progress = _Progress(len(files))
    started = time.monotonic()
    catalog = await open_catalog(settings.database_url)
    try:
        records = []
        skipped = conflicts = already = size = 0
        for n, f in enumerate(files, start=1):
            try:
                info = read_info(f)
            except NotDicomError as exc:
                skipped += 1
                print(f"\rskipped {f}: {exc}", file=sys.stderr)
                continue
            try:
                storage.check_room()
                result = await asyncio.to_thread(storage.store_copy, f, info)
            except DiskFullError as exc:
                print(f"\rstopped at {f}: {exc}; nothing was queued", file=sys.stderr)
                return 1
            if result.outcome is StoreOutcome.CONFLICT:
                conflicts += 1
                print(
                    f"\rskipped {f}: an instance with its UID and another dataset is already stored "
                    f"(kept aside in {storage.conflicts})",
                    file=sys.stderr,
                )
                continue
            already += result.outcome is StoreOutcome.DUPLICATE
            size += result.size
            records.append(
                InstanceRecord(
                    info,
                    storage.relative(result.path),
                    result.size,
                    result.sha256,
                    "manual",
                    "cli",
                    None,
                    time.time(),
                )
            )
            progress.show(n, size)
        progress.show(len(files), size, final=True)
        if not records:
            print("nothing to send", file=sys.stderr)
            return 1
        by_study: dict[str, list[InstanceRecord]] = {}
        for r in records:
            by_study.setdefault(r.info.study_uid, []).append(r)
        for study, group in by_study.items():
            tid = uuid.uuid4().hex
            count = await catalog.enqueue_manual(group, tid, target.name, time.time())
            print(f"transfer {tid}: {count} instances of study {study} queued for {target.name}")
        print(
            f"{len(records)} instances ({size / 1e6:.1f} MB, {already} of them already stored here) in "
            f"{len(by_study)} studies queued for {target.name} in {time.monotonic() - started:.1f} s; "
            f"{skipped} files not DICOM, {conflicts} conflicts"
        )
        return 0
    finally:
        await catalog.close()


def cmd_send(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    return asyncio.run(_send(settings, args.to, args.paths))


def _auditor(settings: config.Settings) -> Any:
    """The audit trail for an operator's command (it shares E:/audit with the running gateway, under its lock)."""
    from gateway.audit import AuditTrail
    from gateway.auditing import Auditor

    return Auditor(AuditTrail(settings.audit_dir, settings.name), settings, settings.d_root)


def _ts(value: Any) -> str:
    return dt.datetime.fromtimestamp(float(value)).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


async def _status(settings: config.Settings, as_json: bool) -> int:
    from gateway import monitoring, status

    health = monitoring.read_health(settings)
    # a stopped gateway's last report is history, not the present: `status` shows it as not running
    view = await status.read(settings, live=health if monitoring.is_fresh(health, time.time()) else None)
    if as_json:
        print(json.dumps(view.as_json(), indent=2, default=str))
        return 0
    print(status_text(settings, view))
    return 0


def status_text(settings: config.Settings, view: Status) -> str:
    """`status` for a terminal, from the read model (`gateway.status`).

    Size: terminal output, one section after another.
    """
    now = view.at
    st = view.catalog
    out = [f"gateway {view.name} ({view.ae_title}), catalog {view.catalog_backend}"]
    if view.catalog_problem:
        out.append(f"  CATALOG: {view.catalog_problem}")
    out.append("" if view.live else "\n(the gateway is not running, or has not reported for a while)")
    out.append("partners:")
    for p in view.partners:
        days = "never" if p.get("days_left") is None else f"{p['days_left']:.0f} d"
        out.append(
            f"  {p['partner']:<16} {p['format']:<9} {p['compression']:<17} receipts {'yes' if p['receipts'] else 'no':<3}"
            f"  keys expire in {days}  identity {p.get('identity', 'as is')}"
            + (f"  SUSPENDED: {p['problem']}" if p.get("problem") else "")
        )
    out.append("\nqueues:")
    for q in view.queues.values():
        out.append(
            f"  {q.name:<7} {q.waiting:>5} waiting (oldest {q.oldest_age:.0f} s), {q.held} held, {q.corrupt} corrupt"
        )
    out += clusterview.text(view)
    nodes = view.nodes()
    if nodes:
        out.append("\nmail nodes:")
        for n in nodes:
            state = f"FAILING: {str(n.get('last_error') or '')[:120]}" if n["failing"] else "ok"
            out.append(
                f"  {n['protocol']:<5} {n['node']:<22} {n.get('ok', 0):>6} ok {n.get('failed', 0):>5} failed  {state}"
            )
    out.append("\ntransfers by state:")
    for row in st.get("transfers_by_state") or [{"direction": "-", "state": "none", "count": 0}]:
        out.append(f"  {row['direction']:>3} {row['state']:<10} {row['count']:>6}")
    out.append("\nrecent transfers (MB: DICOM bytes → bytes on the wire):")
    out.append(
        f"  {'id':<32} {'dir':<3} {'partner':<14} {'state':<10} {'mails':>7} {'inst':>5} {'MB':>15}  "
        f"{'updated':<19}  receipt (out) / PACS (in)"
    )
    for t in st.get("transfers", []):
        mails = f"{t['parts_done']}/{t['parts_total'] or '?'}"
        size = f"{t['bytes'] / 1e6:.1f}" + (f" → {t['bytes_wire'] / 1e6:.1f}" if t.get("bytes_wire") else "")
        out.append(
            f"  {t['id'][-32:]:<32} {t['direction']:<3} {t['partner'][:14]:<14} {t['state']:<10} {mails:>7} "
            f"{t['instances']:>5} {size:>15}  {_ts(t['updated_at']):<19}  {outcome_text(t)}"
            + (f"  ({t['error']})" if t["error"] else "")
            + (
                "  INCOMPLETE after the reassembly deadline"
                if t["direction"] == "in"
                and t["state"] == "receiving"
                and now - float(t["created_at"]) > settings.mail.reassembly_deadline
                else ""
            )
        )
    if view.fragments:
        out.append("\nmessage/partial groups being reassembled:")
        for g in view.fragments:
            out.append(
                f"  {g['key']}  {g['have']}/{g['total'] or '?'} fragments since {_ts(g['first_seen'])}"
                + ("  OVERDUE" if g["overdue"] else "")
            )
    if view.held:
        out.append(f"\nset aside ({len(view.held)}; see `queue`):")
        for h in view.held[:20]:
            out.append(f"  {h.queue:<6} {h.state:<7} {h.id}  {h.reason[:100]}")
    if view.conflicts:
        out.append(
            f"\nconflicts (same UID, other content, kept in {settings.d_root}/conflicts): {len(view.conflicts)}"
        )
        out += [f"  {name}" for name in view.conflicts[:20]]
    out.append("\nrecent studies:")
    out.append(f"  {'study instance UID':<64} {'series':>6} {'inst':>5} {'MB':>8}  last received")
    for s in st.get("studies", []):
        out.append(
            f"  {s['study_uid']:<64} {s['series']:>6} {s['instances']:>5} {s['bytes'] / 1e6:>8.1f}  {_ts(s['last_received'])}"
        )
    last = view.backup_last
    out.append(
        "\nlast backup: "
        + (
            "none yet"
            if not last
            else f"{'ok' if last.get('ok') else 'FAILED'} {_ts(last.get('at'))} {last.get('detail', '')}"
        )
    )
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    return asyncio.run(_status(settings, args.json))


async def _queue(settings: config.Settings, action: str, item_id: str | None, as_json: bool) -> int:
    """Size: the `queue` command's listing and actions, with their output."""
    from gateway.catalog import open_catalog
    from gateway.core.queue import QueueState
    from gateway.fragments import FragmentStore
    from gateway.spool import Spool
    from gateway.storage import Storage

    storage = Storage(settings.d_root)
    queues = {"outbox": Spool(storage.outbox, storage.tmp), "inbox": Spool(storage.inbox, storage.tmp)}
    fragments = FragmentStore.of(storage)
    if action == "list":
        listing: dict[str, Any] = {
            name: {
                "counts": q.counts() if q.root.exists() else {},
                "set_aside": [
                    {
                        "id": i.id,
                        "state": i.state.value,
                        "reason": i.meta.get("reason", ""),
                        "since": i.meta.get("state_since"),
                        "authenticated": i.meta.get("authenticated"),
                        "content_dropped": i.meta.get("content_dropped"),
                    }
                    for state in (QueueState.HOLD, QueueState.CORRUPT)
                    for i in (q.items(state) if q.dirs[state].exists() else [])
                ],
            }
            for name, q in queues.items()
        }
        if as_json:
            print(json.dumps(listing, indent=2, default=str))
            return 0
        for name, data in listing.items():
            counts = " ".join(f"{k}={v}" for k, v in data["counts"].items())
            print(f"{name}: {counts}")
            for entry in data["set_aside"]:
                dropped = f"  [bytes dropped: {entry['content_dropped']}]" if entry["content_dropped"] else ""
                print(
                    f"  {entry['state']:<8} {entry['id']}  {_ts(entry['since'])}  {entry['reason']}{dropped}"
                )
        for g in fragments.groups():
            state = f"dropped: {g.dropped}" if g.dropped else "(discard ID drops it)"
            print(
                f"fragments: {g.key}  {g.have}/{g.total or '?'} from {g.sender}, {g.bytes} bytes, "
                f"since {_ts(g.first_seen)}  {state}"
            )
        return 0

    from gateway.operator import ActionRefused, OperatorActions

    catalog = await open_catalog(settings.database_url)
    try:
        actions = OperatorActions(settings, storage, catalog, _auditor(settings))
        who = f"cli:{getpass.getuser()}"
        done = await (actions.release if action == "release" else actions.discard)(str(item_id), who)
    except ActionRefused as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        await catalog.close()
    print(done)
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.id:
        print(f"queue {args.action} needs the item id (see `queue list`)", file=sys.stderr)
        return 2
    settings = _load(args.config)
    return asyncio.run(_queue(settings, args.action, args.id, args.json))


def cmd_backup(args: argparse.Namespace) -> int:
    from gateway import backup

    settings = _load(args.config)
    setup_logging(settings.log_level)
    who = f"cli:{getpass.getuser()}"
    try:
        result = asyncio.run(backup.run_backup(settings))
    except Exception as exc:
        backup.record_outcome(settings, False, f"{type(exc).__name__}: {exc}")
        asyncio.run(_auditor(settings).backup(False, False, "-", type(exc).__name__, who))
        print(f"backup failed: {exc}", file=sys.stderr)
        return 1
    backup.record_outcome(settings, True, f"{result.path.name}: {result.files} files, {result.bytes} bytes")
    asyncio.run(
        _auditor(settings).backup(
            False, True, result.path.name, f"{result.files} files, {result.bytes} bytes", who
        )
    )
    print(f"backup {result.path}: {result.files} files, {result.bytes} bytes, rows {result.rows}")
    if result.removed:
        print(f"removed by retention: {', '.join(result.removed)}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from gateway import backup

    folder = Path(args.path)
    try:
        manifest = backup.verify(folder)
        url = args.database_url
        if url is None:
            restored_config = folder / "config" / "gateway.toml"
            import tomllib

            url = tomllib.loads(restored_config.read_text()).get("database", {}).get("url")
            if url is None:
                raise backup.BackupError(
                    "the backed-up configuration uses the default SQLite catalog: give --database-url"
                )
        counts = asyncio.run(
            backup.restore(folder, url, Path(args.config_to) if args.config_to else None, force=args.force)
        )
    except backup.BackupError as exc:
        print(f"restore refused: {exc}", file=sys.stderr)
        return 1
    print(f"restored {manifest['gateway']} from {folder.name} into {url.split('://')[0]}: {counts}")
    summary = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()) if n)
    trail = backup.record_restore(folder, manifest, f"cli:{getpass.getuser()}", True, summary)
    print(
        f"recorded in the audit trail {trail}"
        if trail
        else "(the set is not under an e_root/backup: the restore is not in an audit trail)"
    )
    if args.config_to:
        restored = Path(args.config_to) / "gateway.toml"
        try:
            config.load(restored)
        except (
            ConfigError
        ) as exc:  # e.g. a private key that was not in the set and is not back at its path yet
            print(f"the restored configuration does not start yet: {exc}", file=sys.stderr)
            return 1
        print(f"configuration: {restored} (start with: dicom-mail-gateway run -c {restored})")
    return 0


def cmd_check_mk(args: argparse.Namespace) -> int:
    from gateway import monitoring

    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        # check_mk must still get a section: the configuration problem is the service state
        print('<<<local:sep(0)>>>\n2 "DMG Configuration" - ' + str(exc).replace("\n", " "))
        return 0
    print(monitoring.render(asyncio.run(monitoring.collect(settings))), end="")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from gateway.devtools import devenv

    cfg = devenv.prepare(Path(args.root).resolve(), port=args.port)
    settings = _load(str(cfg))
    setup_logging(settings.log_level)
    password_file = cfg.parent / "web-password"
    if not os.environ.get(settings.web.password_env):
        # the page needs a login on loopback too: a password made once for this dev machine, readable by root only
        if not password_file.exists():
            password_file.touch(mode=0o600)
            password_file.write_text(secrets.token_urlsafe(12) + "\n")
        os.environ[settings.web.password_env] = password_file.read_text().strip()
    print(
        f"\n  dev gateway: send DICOM to {settings.dicom_bind}:{settings.dicom_port}, Called AE title "
        f"{settings.partners[0].ae_title} (loopback partner: the study goes out by mail and comes back here)\n"
        f"  e.g.  storescu -aec {settings.partners[0].ae_title} {settings.dicom_bind} {settings.dicom_port} +sd SOME_DICOM_FOLDER\n"
        f"  then  dicom-mail-gateway status -c {cfg}\n"
        f"  web page: http://127.0.0.1:{settings.web.port}/ (user operator, password in {password_file})\n",
        flush=True,
    )
    return _serve(settings)


async def _operator(settings: config.Settings, act: Callable[[OperatorActions, str], Awaitable[str]]) -> int:
    """One operator action against the catalog a running gateway uses too: what it did, or why it was refused."""
    from gateway.catalog import open_catalog
    from gateway.operator import ActionRefused, OperatorActions
    from gateway.storage import Storage

    catalog = await open_catalog(settings.database_url)
    try:
        actions = OperatorActions(settings, Storage(settings.d_root), catalog, _auditor(settings))
        print(await act(actions, f"cli:{getpass.getuser()}"))
        return 0
    except ActionRefused as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        await catalog.close()


async def _explain(settings: config.Settings, study: str) -> int:
    """`route --explain`, against the catalog a running gateway uses too."""
    from gateway.catalog import open_catalog
    from gateway.stages.route import explain

    catalog = await open_catalog(settings.database_url)
    try:
        print("\n".join(await explain(settings.routing, catalog, settings.d_root, study)))
        return 0
    finally:
        await catalog.close()


def cmd_route(args: argparse.Namespace) -> int:
    return asyncio.run(_explain(_load(args.config), args.explain))


def cmd_resend(args: argparse.Namespace) -> int:
    return asyncio.run(
        _operator(
            _load(args.config), lambda actions, who: actions.resend(args.study, args.to, who, args.series)
        )
    )


def cmd_cluster(args: argparse.Namespace) -> int:
    """`cluster forget NODE`: a node taken out of the cluster for good leaves status and check_mk."""
    return asyncio.run(
        _operator(_load(args.config), lambda actions, who: actions.forget_node(args.node, who))
    )


def cmd_audit(args: argparse.Namespace) -> int:
    """`audit verify [DAY]` or `audit --patient ID | --study UID | --partner NAME [--since] [--until]`."""
    from gateway.audit import AuditTrail
    from gateway.auditread import history

    settings = _load(args.config)
    trail = AuditTrail(settings.audit_dir, settings.name)
    if args.action == "verify":
        days = [args.day] if args.day else trail.days()
        bad = 0
        for day in days:
            ok, said = trail.verify(day)
            print(said)
            bad += not ok
        return 1 if bad else 0

    def when(text: str | None) -> float | None:
        return dt.datetime.fromisoformat(text).timestamp() if text else None

    if not (args.patient or args.study or args.partner):
        print("audit: give --patient, --study or --partner (or: audit verify [DAY])", file=sys.stderr)
        return 2
    # other gateways on this machine (the sending and the receiving side of a test site, say): their trails too
    others = [_load(c) for c in args.also or []]
    trails = [trail, *(AuditTrail(o.audit_dir, o.name) for o in others)]
    lines = history(
        trails if others else trail,
        patient=args.patient,
        study=args.study,
        partner=args.partner,
        since=when(args.since),
        until=when(args.until),
    )
    print("\n".join(lines) if lines else "no events")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point.

    Size: one argparse parser per command, read top to bottom like the usage text."""
    ap = argparse.ArgumentParser(prog="dicom-mail-gateway", description="DICOM e-mail gateway")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the gateway")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("send", help="enqueue DICOM files or folders for a partner")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--to", required=True, help="partner name")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_send)
    p = sub.add_parser("status", help="studies and transfers by state")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("route", help="which routing rules match a stored study, and why")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--explain", required=True, metavar="STUDY_UID")
    p.set_defaults(func=cmd_route)
    p = sub.add_parser(
        "resend", help="queue a stored study (or one series) for a partner, again or for the first time"
    )
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--to", required=True, help="partner name")
    p.add_argument("--series", help="only this series (Series Instance UID)")
    p.add_argument("study", metavar="STUDY_UID")
    p.set_defaults(func=cmd_resend)
    p = sub.add_parser(
        "audit", help="the audit trail: a patient's, study's or partner's history; verify the chain"
    )
    p.add_argument("-c", "--config", required=True)
    p.add_argument("action", nargs="?", choices=["show", "verify"], default="show")
    p.add_argument("day", nargs="?", help="verify: the day (YYYY-MM-DD, UTC); default every day")
    p.add_argument("--patient", help="Patient ID")
    p.add_argument("--study", help="Study Instance UID")
    p.add_argument("--partner", help="partner name")
    p.add_argument("--since", help="ISO date or date-time")
    p.add_argument("--until", help="ISO date or date-time")
    p.add_argument(
        "--also",
        action="append",
        metavar="CONFIG",
        help="another gateway's configuration on this machine: its trail too",
    )
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("cluster", help="cluster operations: forget a node removed for good")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("action", choices=["forget"])
    p.add_argument("node", help="the node's name ([cluster] node)")
    p.set_defaults(func=cmd_cluster)
    p = sub.add_parser("backup", help="back up configuration, certificates and catalog now")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="verify a backup set and rebuild catalog and configuration from it")
    p.add_argument("path")
    p.add_argument("--database-url", help="target catalog (default: the one in the backed-up configuration)")
    p.add_argument(
        "--config-to", help="folder for configuration and certificates (default: their original paths)"
    )
    p.add_argument(
        "--force", action="store_true", help="restore into a non-empty catalog / over existing files"
    )
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("check-mk", help="print a check_mk local-check section (no patient data)")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check_mk)
    p = sub.add_parser("queue", help="list the mail queues; release or discard a held or corrupt item")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("action", choices=["list", "release", "discard"], nargs="?", default="list")
    p.add_argument("id", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue)
    p = sub.add_parser(
        "dev", help="run with embedded defaults: dev certs, local mail cluster, loopback partner"
    )
    p.add_argument("--root", default=".", help="checkout root (certs/dev, storage/, .dev/ go below it)")
    p.add_argument("--port", type=int, default=11112)
    p.set_defaults(func=cmd_dev)
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
