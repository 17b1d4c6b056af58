"""Operating state for check_mk, without any patient data.

The running gateway publishes `d_root/state/health.json` every few seconds (heartbeat, mail node health, counters).
`dicom-mail-gateway check-mk` reads it together with the queues, the catalog, the certificates, the last backup
and the free space, and prints a check_mk local-check section:

    <<<local:sep(0)>>>
    0 "DMG DICOM reception" instances_24h=120 accepting on 127.0.0.1:11112
    2 "DMG Certificate partner gateway-b" days_left=-3;30;14 expired 2026-11-20

Install: copy or link `contrib/check_mk/dicom_mail_gateway` into the agent's `local/` directory (see README).
Everything printed is counts, ages, node addresses and certificate names: never a patient name, ID or birth date.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway import status
from gateway.checkmk import CRIT, OK, UNKNOWN, WARN, Metric, Service
from gateway.config import Settings
from gateway.status import QueueView, Status
from gateway.volume import node_state

__all__ = ["CRIT", "OK", "UNKNOWN", "WARN", "Metric", "Service", "collect"]

HEARTBEAT_STALE = 120.0


def _upper(value: float, warn: float, crit: float) -> int:
    return CRIT if value >= crit else WARN if value >= warn else OK


def _lower(value: float, warn: float, crit: float) -> int:
    return CRIT if value <= crit else WARN if value <= warn else OK


# ------------------------------------------------------------------------------------------------ health file
def health_path(settings: Settings) -> Path:
    """Where the running gateway publishes its health."""
    return node_state(settings.d_root, settings.node) / "health.json"


def write_health(settings: Settings, data: dict[str, Any]) -> None:
    """Publish the health document atomically (no fsync: it is rewritten every few seconds)."""
    path = health_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".health.json.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def is_fresh(health: dict[str, Any] | None, now: float) -> bool:
    """Whether a health document is the running gateway's present (its heartbeat is recent)."""
    return health is not None and now - float(health.get("heartbeat", 0)) <= HEARTBEAT_STALE


def read_health(settings: Settings) -> dict[str, Any] | None:
    try:
        return dict(json.loads(health_path(settings).read_text()))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ services
def _reception(settings: Settings, health: dict[str, Any] | None, now: float, instances_24h: int) -> Service:
    host = "127.0.0.1" if settings.dicom_bind in ("0.0.0.0", "::", "") else settings.dicom_bind
    try:
        with socket.create_connection((host, settings.dicom_port), timeout=3):
            listening = True
    except OSError:
        listening = False
    metrics = (Metric("instances_24h", instances_24h),)
    if not listening:
        return Service(
            CRIT, "DMG DICOM reception", f"nothing listens on {host}:{settings.dicom_port}", metrics
        )
    if not is_fresh(health, now):
        return Service(CRIT, "DMG DICOM reception", "the gateway's heartbeat is missing or stale", metrics)
    return Service(OK, "DMG DICOM reception", f"accepting on {host}:{settings.dicom_port}", metrics)


def _stages(health: dict[str, Any] | None) -> Service:
    """Pipeline stages that have work and make no progress (or whose loop stopped), and mails the fetcher gave
    up on after they broke its session again and again (they stay on the server for the mail operator)."""
    stalled = dict((health or {}).get("stalled", {}))
    given_up = int((health or {}).get("fetch_given_up", 0))
    text = "; ".join(f"{stage}: {why}" for stage, why in sorted(stalled.items())) or "every stage is moving"
    if given_up:
        text += f"; {given_up} mails in the mailbox cannot be fetched (left on the server)"
    return Service(
        CRIT if stalled else WARN if given_up else OK,
        "DMG Pipeline stages",
        text,
        (Metric("stalled", len(stalled)), Metric("unfetchable", given_up)),
    )


def _queue(settings: Settings, q: QueueView, label: str) -> Service:
    if not q.counts and not q.waiting:
        return Service(OK, f"DMG {label} queue", "empty", (Metric("depth", 0),))
    aside = q.held + q.corrupt
    m = settings.monitoring
    state = max(
        _upper(q.waiting, m.queue_depth_warn, m.queue_depth_crit),
        _upper(q.oldest_age, m.queue_age_warn, m.queue_age_crit),
    )
    if aside:
        state = max(state, WARN)
    text = f"{q.waiting} waiting, oldest {q.oldest_age:.0f} s, {aside} held or corrupt"
    return Service(
        state,
        f"DMG {label} queue",
        text,
        (
            Metric("depth", q.waiting, m.queue_depth_warn, m.queue_depth_crit),
            Metric("oldest_age", round(q.oldest_age), m.queue_age_warn, m.queue_age_crit),
            Metric("set_aside", aside),
        ),
    )


def _nodes(view: Status) -> list[Service]:
    out = []
    for n in view.nodes():
        name = f"DMG Mail node {n['node']} {n['protocol'].upper()}"
        last_ok = n.get("last_ok")
        ok_age = f"last success {view.at - float(last_ok):.0f} s ago" if last_ok else "no success yet"
        if n["failing"]:
            out.append(Service(CRIT, name, f"failing: {str(n.get('last_error') or '')[:200]}; {ok_age}"))
        else:
            out.append(Service(OK, name, ok_age if last_ok else "not used yet"))
    return out


def _receipts(receipts: dict[str, int]) -> Service:
    """Partners' receipts (MDN) for the last 7 days: a failure at a partner or a receipt contradicting an earlier
    one (forged, replayed, or a partner that changed its mind), or a receipt whose digests show that the partner
    holds other contents than we sent, is CRIT; a receipt with a warning (the partner stored the study, its PACS
    refused or did not commit some of it, or did not answer) or a missing receipt is WARN."""
    failed, overdue = receipts.get("failed", 0), receipts.get("overdue", 0)
    contradicted, warning = receipts.get("contradicted", 0), receipts.get("warning", 0)
    differs = receipts.get("differs", 0)
    return Service(
        CRIT if failed or contradicted or differs else WARN if overdue or warning else OK,
        "DMG Receipts",
        f"{receipts.get('confirmed', 0)} confirmed, {warning} with a warning, {receipts.get('awaited', 0)} "
        f"awaited, {overdue} overdue, {failed} failed at the partner, {contradicted} contradicted by a later "
        f"receipt, {differs} with contents that differ from what was sent (7 days)",
        tuple(
            Metric(k, receipts.get(k, 0))
            for k in ("confirmed", "warning", "awaited", "overdue", "failed", "contradicted", "differs")
        ),
    )


def _incomplete(settings: Settings, view: Status) -> Service:
    """Inbound sets and message/partial groups still incomplete after the reassembly deadline."""
    stuck_sets = int(view.counts.get("stuck_in", 0))
    groups = [g for g in view.fragments if g["overdue"]]
    hours = settings.mail.reassembly_deadline / 3600
    return Service(
        WARN if stuck_sets or groups else OK,
        "DMG Incomplete arrivals",
        f"{stuck_sets} inbound sets and {len(groups)} fragmented messages still incomplete after {hours:g} h",
        (Metric("sets", stuck_sets), Metric("fragment_groups", len(groups))),
    )


def _pgp_keys(settings: Settings, now: float) -> list[Service]:
    """Days until each partner's OpenPGP key expires (keys without expiry are OK)."""
    from gateway.adapters.openpgp import scan_key_file

    m = settings.monitoring
    out = []
    for p in settings.partners:
        if p.pgp_key is None:
            continue
        name = f"DMG OpenPGP key partner {p.name}"
        try:
            keys = scan_key_file(p.pgp_key)
        except (OSError, ValueError) as exc:
            out.append(Service(CRIT, name, f"unreadable: {type(exc).__name__}"))
            continue
        if len(keys) != 1:
            out.append(Service(CRIT, name, f"expected one key, found {len(keys)}"))
            continue
        if keys[0].expires is None:
            out.append(Service(OK, name, f"{keys[0].fingerprint}, no expiry"))
            continue
        days = (keys[0].expires - now) / 86400
        state = _lower(days, m.cert_days_warn, m.cert_days_crit)
        out.append(
            Service(
                state,
                name,
                f"{keys[0].fingerprint}, " + ("expired" if days < 0 else f"expires in {days:.0f} days"),
                (Metric("days_left", round(days, 1), m.cert_days_warn, m.cert_days_crit),),
            )
        )
    return out


def _certificates(settings: Settings, now: float) -> list[Service]:
    certs = [("mail client", settings.mail.client_cert), ("S/MIME own", settings.smime_cert)]
    certs += [(f"partner {p.name}", p.smime_cert) for p in settings.partners if p.smime_cert is not None]
    m = settings.monitoring
    out = _pgp_keys(settings, now)
    for label, path in certs:
        name = f"DMG Certificate {label}"
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError) as exc:
            out.append(Service(CRIT, name, f"unreadable: {type(exc).__name__}"))
            continue
        days = (cert.not_valid_after_utc.timestamp() - now) / 86400
        state = _lower(days, m.cert_days_warn, m.cert_days_crit)
        when = cert.not_valid_after_utc.date().isoformat()
        text = f"expired {when}" if days < 0 else f"valid until {when}"
        out.append(
            Service(
                state, name, text, (Metric("days_left", round(days, 1), m.cert_days_warn, m.cert_days_crit),)
            )
        )
    return out


def _backup(settings: Settings, view: Status) -> Service:
    last = view.backup_last
    m = settings.monitoring
    if last is None:
        return Service(WARN, "DMG Backup", "no backup recorded yet")
    age_h = (view.at - float(last.get("at", 0))) / 3600
    metric = (Metric("age_hours", round(age_h, 1), m.backup_age_warn_h, m.backup_age_crit_h),)
    if not last.get("ok"):
        return Service(
            CRIT, "DMG Backup", f"last backup failed {age_h:.1f} h ago: {last.get('detail', '')}", metric
        )
    state = _upper(age_h, m.backup_age_warn_h, m.backup_age_crit_h)
    return Service(state, "DMG Backup", f"last backup {age_h:.1f} h ago: {last.get('detail', '')}", metric)


def _space(settings: Settings, label: str, path: Path, reserve: int, inode_reserve: int = 0) -> Service:
    from gateway.storage import free_inodes

    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    inodes = free_inodes(probe)
    pct = 100.0 * usage.free / usage.total if usage.total else 0.0
    m = settings.monitoring
    state = _lower(pct, m.free_pct_warn, m.free_pct_crit)
    text = f"{usage.free / 1e9:.1f} GB free of {usage.total / 1e9:.1f} GB ({pct:.0f} %)"
    metrics = [
        Metric("free_pct", round(pct, 1), m.free_pct_warn, m.free_pct_crit),
        Metric("free_bytes", usage.free),
    ]
    if inodes is not None:
        text += f", {inodes} inodes free"
        metrics.append(Metric("free_inodes", inodes))
    if usage.free < reserve or (inodes is not None and inodes < inode_reserve):
        state = CRIT
        text += ", below the reserve: DICOM refused, mail paused"
    return Service(state, f"DMG Free space {label}", text, tuple(metrics))


def _quarantine(settings: Settings, view: Status) -> Service:
    held_in = [h for h in view.held if h.queue == "inbox"]
    held = len(held_in)
    corrupt = sum(1 for h in view.held if h.state == "corrupt")
    conflicts = len(view.conflicts)
    untrusted = view.untrusted_bytes
    dropped = sum(1 for h in held_in if (h.dropped_at or 0) > view.at - 86400)
    quota = settings.mail.untrusted_quota
    text = (
        f"{held} inbound mails held, {conflicts} conflicting instances; unauthenticated content "
        f"{untrusted / 1e6:.1f} of {quota / 1e6:.0f} MB"
    )
    if dropped:
        text += f"; the quota dropped the bytes of {dropped} unauthenticated mails in 24 h (a flood?)"
    if corrupt:
        text += f"; {corrupt} mails set aside by an internal error (a bug: see the traceback in `queue`)"
    return Service(
        CRIT if dropped or corrupt else WARN if held or conflicts else OK,
        "DMG Quarantine",
        text + " (see `dicom-mail-gateway queue` and `status`)",
        (
            Metric("held", held),
            Metric("conflicts", conflicts),
            Metric("untrusted_bytes", untrusted, None, quota),
            Metric("quota_drops_24h", dropped),
            Metric("corrupt", corrupt),
        ),
    )


async def collect(settings: Settings, now: float | None = None) -> list[Service]:
    """Every service, judged from the status read model (`gateway.status`: the catalog, the files, and the
    gateway's last `health.json`; the gateway itself need not answer)."""
    from gateway import clusterview

    # the address book is judged by the certificate and key services below, not read twice
    view = await status.read(settings, live=read_health(settings), limit=1, now=now, partners=[])
    counts = view.counts
    services = [_reception(settings, view.live, view.at, int(counts.get("recent", 0)))]
    services += [
        _queue(settings, view.queues["outbox"], "Outbound"),
        _queue(settings, view.queues["inbox"], "Inbound"),
    ]
    services += _nodes(view)
    services.append(_stages(view.live))
    if view.catalog_problem:
        services.append(Service(CRIT, "DMG Transfers failed", view.catalog_problem))
    else:
        failed = int(counts.get("failed", 0))
        services.append(
            Service(
                WARN if failed else OK,
                "DMG Transfers failed",
                f"{failed} outbound transfers failed in 7 days",
                (Metric("failed_7d", failed),),
            )
        )
    if settings.pacs:
        services.append(_forwarding(dict(counts.get("forwards", {}))))
    if not view.catalog_problem:
        services.append(_receipts(dict(counts.get("receipts", {}))))
    services.append(_incomplete(settings, view))
    services += _certificates(settings, view.at)
    services.append(_backup(settings, view))
    services.append(_space(settings, "D:", settings.d_root, settings.min_free, settings.min_free_inodes))
    services.append(_space(settings, "E:", settings.e_root, 0))
    services.append(_quarantine(settings, view))
    services.append(_audit(settings, view.at))
    services += clusterview.services(view)
    return services


def _audit(settings: Settings, now: float) -> Service:
    """The audit trail's way to the hospital's repository: records written on E: that it has not got yet, and for
    how long (the repository away, or our certificate refused). No repository: the local copy only (OK)."""
    from gateway.auditread import backlog

    repo = settings.audit.repository
    if repo is None:
        return Service(OK, "DMG Audit trail", "local copy on E: only (no [audit] repository configured)")
    waiting, oldest = backlog(settings.audit_dir)
    age_min = 0.0 if oldest is None else max(0.0, (now - oldest) / 60)
    metrics = (Metric("waiting", waiting), Metric("oldest_waiting_minutes", round(age_min, 1), 10, 60))
    where = f"{repo.host}:{repo.port}"
    if not waiting:
        return Service(OK, "DMG Audit trail", f"the repository {where} has every record", metrics)
    return Service(
        _upper(age_min, 10, 60),
        "DMG Audit trail",
        f"{waiting} records wait on E: for the repository {where}, the oldest for {age_min:.0f} min "
        "(nothing is lost; they go when it answers)",
        metrics,
    )


def _forwarding(forwards: dict[str, int]) -> Service:
    """Forwards to the local PACS by state; "stored" ones wait for the PACS's storage commitment, refusals
    include instances the PACS did not commit."""
    refused = forwards.get("rejected", 0)
    waiting = forwards.get("pending", 0) + forwards.get("retry", 0) + forwards.get("stored", 0)
    return Service(
        WARN if refused else OK,
        "DMG PACS forwarding",
        f"{forwards.get('accepted', 0)} accepted, {waiting} waiting, {refused} instances refused or not "
        "committed by the PACS",
        (
            Metric("accepted", forwards.get("accepted", 0)),
            Metric("waiting", waiting),
            Metric("refused", refused),
        ),
    )


def render(services: list[Service]) -> str:
    """The local-check section."""
    return "\n".join(["<<<local:sep(0)>>>", *(s.render() for s in services)]) + "\n"
