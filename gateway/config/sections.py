"""One function per section of the configuration file, each reading and checking its own table.

`from_dict` (in `__init__`) calls them in order and builds `Settings`. A new key goes into its section's function
here, its dataclass in `model.py`, and `gateway.example.toml` (a test checks the example names every key read here).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from pathlib import Path
from typing import Any

from gateway.catalog.db import MysqlTarget
from gateway.config.model import (
    AuditSettings,
    BackupSettings,
    ClusterSettings,
    DicomTls,
    MailSettings,
    MonitoringSettings,
    Node,
    Pacs,
    PgpSettings,
    WebSettings,
    is_loopback,
)
from gateway.config.reader import (
    Reader,
    check_addr,
    check_ae,
    check_name,
    check_positive,
    nodes,
    parse_size,
    parse_size_key,
)


def _dicom_access(
    gw: Reader, dicom_bind: str
) -> tuple[list[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """Who may send DICOM: calling AE titles and networks; a port reachable from outside must name one of them."""
    allowed_ae_raw = gw.get("allowed_calling_ae", list, [])
    for item in allowed_ae_raw:
        if not isinstance(item, str) or check_ae(item) is not None:
            raise gw.fail("allowed_calling_ae", f"entry {item!r} is not a valid AE title")
    networks = []
    for item in gw.get("allowed_networks", list, []):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise gw.fail("allowed_networks", f"entry {item!r} is not an address or network (CIDR)") from None
    open_to_any_peer = gw.get("open_to_any_peer", bool, False)
    if not is_loopback(dicom_bind) and not allowed_ae_raw and not networks and not open_to_any_peer:
        # any host that reaches the port could have us sign and mail a study to any partner: an open relay
        raise gw.fail(
            "dicom_bind",
            f"{dicom_bind} reaches beyond this machine, and allowed_networks and allowed_calling_ae are both "
            "empty: name the modalities' networks or AE titles (or set open_to_any_peer = true)",
        )
    return allowed_ae_raw, networks


def _dicom_tls(gw: Reader) -> DicomTls | None:
    """The DICOM TLS port, its certificate checked now (a gateway must not start with one that cannot be used)."""
    dicom_tls = None
    if gw.get("dicom_tls_port", int, 0, check=lambda v: None if 0 <= v < 65536 else "not a port"):
        dicom_tls = DicomTls(
            port=gw.get("dicom_tls_port", int),
            cert=gw.path("dicom_tls_cert"),
            key=gw.path("dicom_tls_key"),
            client_ca=gw.path("dicom_tls_ca") if "dicom_tls_ca" in gw.table else None,
        )
        from gateway.tls import dicom_server_context  # tls.py builds every context; it imports this module

        try:
            dicom_server_context(dicom_tls)
        except (OSError, ssl.SSLError) as exc:
            raise gw.fail("dicom_tls_cert", f"certificate, key or CA not usable: {exc}") from None
    return dicom_tls


def gateway_section(root: Reader) -> dict[str, Any]:
    """[gateway]: names, the DICOM port and who may use it."""
    gw = root.table_of("gateway")
    name = gw.get(
        "name",
        str,
        check=check_name,
    )
    ae_title = gw.get("ae_title", str, check=check_ae)
    dicom_bind = gw.get("dicom_bind", str, "127.0.0.1")
    dicom_port = gw.get("dicom_port", int, 11112, check=lambda v: None if 0 <= v < 65536 else "not a port")
    stability_delay = float(
        gw.get("stability_delay", (int, float), 30, check=lambda v: None if v >= 0 else "must be >= 0")
    )
    log_level = gw.get(
        "log_level",
        str,
        "INFO",
        check=lambda v: (
            None if v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else "DEBUG, INFO, WARNING or ERROR"
        ),
    ).upper()
    retry_max_age = float(gw.get("retry_max_age", (int, float), 2 * 24 * 3600, check=check_positive))
    allowed_ae_raw, networks = _dicom_access(gw, dicom_bind)
    dicom_tls = _dicom_tls(gw)
    dicom_timeout = float(gw.get("dicom_timeout", (int, float), 60, check=check_positive))
    dicom_workers = int(
        gw.get(
            "dicom_workers",
            int,
            max(1, min(8, os.cpu_count() or 1)),
            check=lambda v: None if 1 <= v <= 64 else "must be between 1 and 64",
        )
    )
    gw.done()
    return {
        "name": name,
        "ae_title": ae_title,
        "dicom_bind": dicom_bind,
        "dicom_port": dicom_port,
        "stability_delay": stability_delay,
        "log_level": log_level,
        "retry_max_age": retry_max_age,
        "allowed_calling_ae": tuple(allowed_ae_raw),
        "allowed_networks": tuple(networks),
        "dicom_timeout": dicom_timeout,
        "dicom_workers": dicom_workers,
        "dicom_tls": dicom_tls,
    }


def storage_section(root: Reader) -> dict[str, Any]:
    """[storage]: the working volume D:, the backup volume E:, reserves."""
    st = root.table_of("storage")
    d_root = st.path("d_root", must_exist=False)
    e_root = st.path("e_root", must_exist=False)
    keep_days_after_pacs = float(
        st.get(
            "keep_days_after_pacs",
            (int, float),
            7,
            check=lambda v: None if v >= 0 else "must be >= 0 (0 keeps forever)",
        )
    )
    min_free_raw = st.get("min_free", (str, int), "1GB")
    try:
        min_free = parse_size(min_free_raw)
    except ValueError as exc:
        raise st.fail("min_free", str(exc)) from None
    min_free_inodes = int(
        st.get("min_free_inodes", int, 10000, check=lambda v: None if v >= 0 else "must be >= 0")
    )
    st.done()
    return {
        "d_root": d_root,
        "e_root": e_root,
        "keep_days_after_pacs": keep_days_after_pacs,
        "min_free": min_free,
        "min_free_inodes": min_free_inodes,
    }


def _database_url_problem(url: str) -> str | None:
    if url.startswith("sqlite:///"):
        return None
    if not url.startswith("mysql://"):
        return "must start with sqlite:/// or mysql://"
    try:
        MysqlTarget.parse(url)  # one server, or Galera members host:port,host:port in the order preferred
    except ValueError as exc:
        return str(exc)
    return None


def database_section(root: Reader, d_root: Path, file: Path) -> str:
    """[database]: the catalog URL (default: SQLite on D:)."""
    db = root.table_of("database", required=False)
    database_url = db.get(
        "url",
        str,
        f"sqlite:///{d_root / 'catalog.sqlite'}",
        check=_database_url_problem,
    )
    db.done()
    if database_url.startswith("sqlite:///") and not Path(database_url[len("sqlite:///") :]).is_absolute():
        database_url = f"sqlite:///{(file.parent / database_url[len('sqlite:///') :]).resolve()}"
    return database_url


def mail_section(root: Reader) -> MailSettings:
    """[mail]: our mailbox, the mail cluster, timeouts and the limits of what the mailbox may make us hold."""
    m = root.table_of("mail")
    mail = MailSettings(
        address=m.get("address", str, check=check_addr),
        client_cert=m.path("client_cert"),
        client_key=m.path("client_key"),
        ca_bundle=m.path("ca_bundle"),
        smtp_nodes=nodes(m, "smtp_nodes", 25),
        pop3_nodes=nodes(m, "pop3_nodes", 995),
        poll_interval=float(m.get("poll_interval", (int, float), 10, check=check_positive)),
        max_mail_size=parse_size_key(m, "max_mail_size", "20MB"),
        connect_timeout=float(m.get("connect_timeout", (int, float), 15, check=check_positive)),
        io_timeout=float(m.get("io_timeout", (int, float), 120, check=check_positive)),
        node_cooldown=float(
            m.get("node_cooldown", (int, float), 60, check=lambda v: None if v >= 0 else "must be >= 0")
        ),
        subject=m.get("subject", str, "DICOM-eMail"),
        retry_base=float(m.get("retry_base", (int, float), 30, check=check_positive)),
        retry_cap=float(m.get("retry_cap", (int, float), 300, check=check_positive)),
        protocol=m.get(
            "protocol", str, "pop3", check=lambda v: None if v in ("pop3", "imap") else "pop3 or imap"
        ),
        imap_nodes=nodes(m, "imap_nodes", 993) if "imap_nodes" in m.table else (),
        imap_user=m.get("imap_user", str, ""),
        imap_password_env=m.get("imap_password_env", str, ""),
        imap_folder=m.get("imap_folder", str, "INBOX"),
        reassembly_deadline=float(
            m.get("reassembly_deadline", (int, float), 24 * 3600, check=check_positive)
        ),
        receipt_deadline=float(m.get("receipt_deadline", (int, float), 24 * 3600, check=check_positive)),
        max_unpacked_size=parse_size_key(m, "max_unpacked_size", "1GB"),
        max_fetch_size=parse_size_key(m, "max_fetch_size", "0") if "max_fetch_size" in m.table else 0,
        max_inbox_backlog=parse_size_key(m, "max_inbox_backlog", "1GB"),
        untrusted_quota=parse_size_key(m, "untrusted_quota", "2GB"),
        untrusted_quota_per_sender=parse_size_key(m, "untrusted_quota_per_sender", "1GB"),
        receipt_pacs_deadline=float(m.get("receipt_pacs_deadline", (int, float), 900, check=check_positive)),
        negative_receipts_per_hour=m.get(
            "negative_receipts_per_hour", int, 20, check=lambda v: None if v >= 0 else "must be >= 0"
        ),
    )
    if mail.protocol == "imap" and not mail.imap_nodes:
        raise m.fail("imap_nodes", "protocol = imap needs at least one IMAPS node")
    m.done()
    return mail


def keys_section(root: Reader, data: dict[str, Any]) -> tuple[Path, Path, PgpSettings | None]:
    """[smime] (required) and [pgp] (for pgp partners): our own keys."""
    sm = root.table_of("smime")
    smime_cert = sm.path("cert")
    smime_key = sm.path("key")
    sm.done()

    pgp = None
    if "pgp" in data:
        pg = root.table_of("pgp")
        pgp = PgpSettings(key=pg.path("key"), passphrase_env=pg.get("passphrase_env", str, ""))
        pg.done()
    return smime_cert, smime_key, pgp


def backup_section(root: Reader) -> BackupSettings:
    """[backup]: when, how long kept, a second copy, private keys on request."""
    bk = root.table_of("backup", required=False)

    def _check_time(v: str) -> str | None:
        return None if re.fullmatch(r"([01]?\d|2[0-3]):[0-5]\d", v) else "must be HH:MM (local time)"

    hh, mm = bk.get("time", str, "02:00", check=_check_time).split(":")
    backup = BackupSettings(
        time=dt.time(int(hh), int(mm)),
        keep_days=float(bk.get("keep_days", (int, float), 5, check=check_positive)),
        copy_to=bk.get("copy_to", str, ""),
        include_private_keys=bk.get("include_private_keys", bool, False),
        passphrase_env=bk.get("passphrase_env", str, "DMG_BACKUP_PASSPHRASE"),
    )
    bk.done()
    return backup


def audit_section(root: Reader, mail: MailSettings) -> AuditSettings:
    """[audit]: the Audit Record Repository (syslog over TLS with a client certificate; IHE ITI-20)."""
    au = root.table_of("audit", required=False)
    repository = None
    if au.get("repository", str, ""):
        repository = _one_node(au, "repository", 6514)
    settings = AuditSettings(
        repository=repository,
        tls_ca=au.path("tls_ca") if "tls_ca" in au.table else mail.ca_bundle,
        client_cert=au.path("client_cert") if "client_cert" in au.table else mail.client_cert,
        client_key=au.path("client_key") if "client_key" in au.table else mail.client_key,
        app_name=au.get(
            "app_name",
            str,
            "dicom-mail-gateway",
            check=lambda v: None if 0 < len(v) <= 48 else "1 to 48 characters",
        ),
    )
    au.done()
    return settings


def cluster_section(root: Reader, database_url: str) -> ClusterSettings | None:
    """[cluster]: this gateway as one node of a cluster on a shared Galera catalog and a shared D:."""
    if "cluster" not in root.table:
        return None
    cl = root.table_of("cluster")
    node = cl.get(
        "node",
        str,
        check=lambda v: (
            None if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", v) else "1 to 32 of A-Z a-z 0-9 _ -"
        ),
    )
    lease = cl.get("lease", (int, float), 30.0, check=check_positive)
    heartbeat = cl.get("heartbeat", (int, float), lease / 3, check=check_positive)
    if heartbeat * 2 > lease:
        raise cl.fail(
            "heartbeat", f"must be at most half the lease ({lease} s): a claim would lapse between beats"
        )
    grace = cl.get("minority_grace", (int, float), 2 * lease, check=check_positive)
    cl.done()
    if not database_url.startswith("mysql://"):
        raise root.fail("database.url", "a cluster needs the shared MariaDB (Galera) catalog: mysql://…")
    return ClusterSettings(node, float(lease), float(heartbeat), float(grace))


def _one_node(r: Reader, name: str, default_port: int) -> Node:
    raw = r.get(name, str)
    host, _, port = raw.strip().rpartition(":") if ":" in raw else (raw.strip(), "", str(default_port))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise r.fail(name, f"{raw!r} is not 'host' or 'host:port'")
    return Node(host, int(port))


def monitoring_section(root: Reader) -> MonitoringSettings:
    """[monitoring]: the check_mk thresholds."""
    mon = root.table_of("monitoring", required=False)
    defaults = MonitoringSettings()
    monitoring = MonitoringSettings(
        **{
            key: float(
                mon.get(
                    key,
                    (int, float),
                    getattr(defaults, key),
                    check=lambda v: None if v >= 0 else "must be >= 0",
                )
            )
            for key in MonitoringSettings.__dataclass_fields__
        }
    )
    mon.done()
    return monitoring


def web_section(root: Reader) -> WebSettings:
    """[web]: the status page, /metrics and /healthz."""
    w = root.table_of("web", required=False)
    web = WebSettings(
        bind=w.get("bind", str, "127.0.0.1"),
        port=w.get(
            "port", int, 8080, check=lambda v: None if 0 <= v < 65536 else "not a port (0 turns the page off)"
        ),
        show_patient_data=w.get("show_patient_data", bool, False),
        tls_cert=w.path("tls_cert") if "tls_cert" in w.table else None,
        tls_key=w.path("tls_key") if "tls_key" in w.table else None,
        password_env=w.get("password_env", str, "DMG_WEB_PASSWORD"),
        anonymous_on_loopback=w.get("anonymous_on_loopback", bool, False),
        token_env=w.get("token_env", str, "DMG_WEB_TOKENS"),
        cors_origins=tuple(
            w.get(
                "cors_origins",
                list,
                [],
                check=lambda v: (
                    None
                    if all(isinstance(o, str) and o.startswith(("http://", "https://")) for o in v)
                    else 'a list of origins such as "https://viewer.example"'
                ),
            )
        ),
        stow_max_size=parse_size_key(w, "stow_max_size", "4GB"),
        render_workers=w.get(
            "render_workers", int, 2, check=lambda v: None if 1 <= v <= 64 else "from 1 to 64 processes"
        ),
        render_timeout=float(w.get("render_timeout", (int, float), 30.0, check=check_positive)),
        render_memory=parse_size_key(w, "render_memory", "3GB"),
    )
    if web.requires_tls and web.port and (web.tls_cert is None or web.tls_key is None):
        raise w.fail(
            "bind", "a non-loopback address needs tls_cert and tls_key (and a password, see password_env)"
        )
    w.done()
    return web


def pacs_section(root: Reader, ae_title: str) -> tuple[Pacs, ...]:
    """[[pacs]]: the local PACS that receive every inbound instance."""
    pacs_nodes: list[Pacs] = []
    for i, entry in enumerate(root.get("pacs", list, [])):
        if not isinstance(entry, dict):
            raise root.fail(f"pacs[{i}]", "must be a table ([[pacs]])")
        pr = root.within("pacs", f"pacs[{i}]", entry).within(i, f"pacs[{i}]", entry)
        node = Pacs(
            name=pr.get(
                "name",
                str,
                check=check_name,
            ),
            host=pr.get("host", str),
            port=pr.get("port", int, check=lambda v: None if 0 < v < 65536 else "not a port"),
            ae_title=pr.get("ae_title", str, check=check_ae),
            calling_ae=pr.get("calling_ae", str, ae_title, check=check_ae),
            max_attempts=pr.get(
                "max_attempts", int, 5, check=lambda v: None if v >= 1 else "must be at least 1"
            ),
            retry_base=float(pr.get("retry_base", (int, float), 30, check=check_positive)),
            timeout=float(pr.get("timeout", (int, float), 30, check=check_positive)),
            associations=pr.get(
                "associations", int, 2, check=lambda v: None if 1 <= v <= 16 else "must be between 1 and 16"
            ),
            tls_ca=pr.path("tls_ca") if "tls_ca" in entry else None,
            tls_cert=pr.path("tls_cert") if "tls_cert" in entry else None,
            tls_key=pr.path("tls_key") if "tls_key" in entry else None,
            storage_commitment=pr.get("storage_commitment", bool, False),
            commitment_timeout=float(pr.get("commitment_timeout", (int, float), 600, check=check_positive)),
            commitment_batch=pr.get(
                "commitment_batch",
                int,
                500,
                check=lambda v: None if 1 <= v <= 10000 else "must be 1 to 10000",
            ),
            commitment_hold=float(pr.get("commitment_hold", (int, float), 10, check=check_positive)),
        )
        if (node.tls_cert is None) != (node.tls_key is None) or (node.tls_cert and not node.tls_ca):
            raise pr.fail(
                "tls_cert", "DICOM TLS needs tls_ca, and tls_cert with tls_key for a client certificate"
            )
        pr.done()
        if any(other.name == node.name for other in pacs_nodes):
            raise pr.fail("name", f"duplicate PACS name {node.name!r}")
        pacs_nodes.append(node)
    return tuple(pacs_nodes)
