"""The configuration: one TOML file becomes one frozen `Settings`, validated once at start-up.

Every error names the file and the dotted key (`ConfigError`). Relative paths are resolved against the
directory of the configuration file, so a configuration can be moved together with its certificates.
`gateway.example.toml` documents every key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway import formats
from gateway.errors import ConfigError

T = TypeVar("T")

_AE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*$")
_ADDR_RE = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")


@dataclass(frozen=True)
class Node:
    """One mail server endpoint."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


COMPRESSIONS = ("none", "deflate", "jpeg2000-lossless")
SPLITS = ("sets", "partial")


@dataclass(frozen=True)
class Partner:
    """An address-book entry: a teleradiology partner, how to reach it and how its mails are checked."""

    name: str
    addresses: tuple[str, ...]  # the first receives our mails; mails from any of them are the partner's
    ae_title: str
    format: str = "smime"  # a registered mail format (gateway.formats)
    smime_cert: Path | None = None
    pgp_key: Path | None = None
    pgp_fingerprint: str = ""
    institution: str = ""
    location: str = ""
    max_mail_size: int = 0  # 0: mail.max_mail_size
    compression: str = "none"  # COMPRESSIONS
    receipts: bool = True  # request MDNs and expect them back
    split: str = "sets"  # SPLITS: self-contained size-capped mails, or message/partial fragments of one mail
    max_message_size: int = 0  # split = "partial": the size of the one large mail before fragmenting

    @property
    def address(self) -> str:
        """The address our mails go to."""
        return self.addresses[0]


@dataclass(frozen=True)
class MailSettings:
    """The gateway's own mailbox and the mail cluster it uses."""

    address: str
    client_cert: Path
    client_key: Path
    ca_bundle: Path
    smtp_nodes: tuple[Node, ...]
    pop3_nodes: tuple[Node, ...]
    poll_interval: float
    max_mail_size: int
    connect_timeout: float
    io_timeout: float
    node_cooldown: float
    subject: str
    retry_base: float = 30.0
    retry_cap: float = 300.0
    protocol: str = "pop3"  # "pop3" | "imap": how the mailbox is read
    imap_nodes: tuple[Node, ...] = ()
    imap_user: str = ""
    imap_password_env: str = ""  # empty: client certificate (SASL EXTERNAL)
    imap_folder: str = "INBOX"
    reassembly_deadline: float = 24 * 3600.0  # an incomplete set or fragment group is reported after this
    receipt_deadline: float = 24 * 3600.0  # a transfer without the partner's receipt is flagged after this
    max_unpacked_size: int = 1024**3  # DICOM-ZIP: most bytes one archive may unpack to
    # what the mailbox (shared, untrusted) may make us hold: see README "Trust model"
    max_fetch_size: int = 0  # largest mail fetched; 0: twice the largest mail size cap in the configuration
    max_inbox_backlog: int = 1024**3  # fetched mails not yet checked; fetch waits above this
    untrusted_quota: int = 2 * 1024**3  # unauthenticated quarantined mails + fragment groups, all senders
    untrusted_quota_per_sender: int = 1024**3  # the same, per From: address
    negative_receipts_per_hour: int = 20  # refusal receipts to one partner; more are recorded, not sent
    receipt_pacs_deadline: float = 900.0  # a receipt waits at most this long for the PACS's answers


@dataclass(frozen=True)
class PgpSettings:
    """The gateway's own OpenPGP key, for partners in the @GIT PGP/MIME format."""

    key: Path  # armored secret key (exported with gpg --export-secret-keys --armor)
    passphrase_env: str = ""


@dataclass(frozen=True)
class Pacs:
    """A local PACS that receives every inbound instance (C-STORE)."""

    name: str
    host: str
    port: int
    ae_title: str
    calling_ae: str
    max_attempts: int = 5
    retry_base: float = 30.0
    timeout: float = 30.0  # bound of every association and DIMSE step with this PACS
    associations: int = 2  # associations used at once
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True)
class BackupSettings:
    """The nightly backup to e_root/backup."""

    time: dt.time = dt.time(2, 0)
    keep_days: float = 5.0
    copy_to: str = ""
    include_private_keys: bool = False
    passphrase_env: str = "DMG_BACKUP_PASSPHRASE"


def _is_loopback(bind: str) -> bool:
    """True for addresses only this machine can reach."""
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind == "localhost"


@dataclass(frozen=True)
class DicomTls:
    """DICOM over TLS on its own port: our certificate and key, and (optional) the CA whose client certificates
    are required (no CA: any client, as the anonymous TLS of PS3.15's profiles allows)."""

    port: int
    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class MonitoringSettings:
    """WARN/CRIT thresholds of the check_mk services."""

    queue_depth_warn: float = 100
    queue_depth_crit: float = 1000
    queue_age_warn: float = 1800
    queue_age_crit: float = 7200
    cert_days_warn: float = 30
    cert_days_crit: float = 14
    backup_age_warn_h: float = 26
    backup_age_crit_h: float = 50
    free_pct_warn: float = 15
    free_pct_crit: float = 5
    stage_stall: float = 600  # a stage with work and no progress for this many seconds: /healthz 503, CRIT


@dataclass(frozen=True)
class WebSettings:
    """The web port: status page, /metrics, /healthz."""

    bind: str = "127.0.0.1"
    port: int = 8080
    show_patient_data: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    password_env: str = "DMG_WEB_PASSWORD"
    anonymous_on_loopback: bool = False  # opt-out: no login when bound to loopback (a single-user machine)

    @property
    def requires_tls(self) -> bool:
        """Bound to anything but loopback: TLS is required (the password must not cross a network in clear)."""
        return not _is_loopback(self.bind)

    @property
    def requires_login(self) -> bool:
        """A login is required on every address, loopback too (any local user or process could otherwise release
        quarantined mail or see patient images), unless the configuration opts out for loopback."""
        return self.requires_tls or not self.anonymous_on_loopback


@dataclass(frozen=True)
class Settings:
    """Everything the gateway reads from its configuration file."""

    source: Path
    name: str
    ae_title: str
    dicom_bind: str
    dicom_port: int
    stability_delay: float
    d_root: Path
    e_root: Path
    min_free: int
    min_free_inodes: int
    database_url: str
    mail: MailSettings
    smime_cert: Path
    smime_key: Path
    partners: tuple[Partner, ...]
    pgp: PgpSettings | None = None
    log_level: str = "INFO"
    retry_max_age: float = 2 * 24 * 3600.0
    allowed_calling_ae: tuple[str, ...] = ()
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    dicom_timeout: float = 60.0
    dicom_workers: int = 2
    dicom_tls: DicomTls | None = None  # a second DICOM port, TLS only (PS3.15 Annex B)
    backup: BackupSettings = field(default_factory=BackupSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    web: WebSettings = field(default_factory=WebSettings)
    pacs: tuple[Pacs, ...] = ()
    keep_days_after_pacs: float = 7.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    file_refs: tuple[FileRef, ...] = field(default=(), compare=False)  # every file it names (backup, restore)

    def partner_by_ae(self, ae_title: str) -> Partner | None:
        """The partner a Called AE Title routes to, if any."""
        for p in self.partners:
            if p.ae_title == ae_title.strip():
                return p
        return None

    def partner_by_name(self, name: str) -> Partner | None:
        """The partner with this name, if any."""
        return next((p for p in self.partners if p.name == name), None)

    def partner_by_address(self, address: str) -> Partner | None:
        """The partner that owns this mail address (case-insensitive), if any."""
        address = address.strip().lower()
        return next((p for p in self.partners if address in (a.lower() for a in p.addresses)), None)

    def mail_size_for(self, partner: Partner) -> int:
        """The largest mail this partner's mail server takes."""
        return partner.max_mail_size or self.mail.max_mail_size

    @property
    def fetch_cap(self) -> int:
        """The largest mail fetched from the mailbox (`mail.max_fetch_size`, or twice the largest mail size cap of
        the configuration: partners size their mails like ours, with room for other senders' overhead)."""
        if self.mail.max_fetch_size:
            return self.mail.max_fetch_size
        return 2 * max([self.mail.max_mail_size, *(self.mail_size_for(p) for p in self.partners)])

    @property
    def max_inbound_message(self) -> int:
        """The largest message that message/partial fragments may add up to: the largest `max_message_size` of
        any partner, with the same margin."""
        return 2 * max([200 * 1024**2, *(p.max_message_size for p in self.partners)])

    @property
    def catalog_is_sqlite(self) -> bool:
        """True when the catalog is the embedded SQLite database."""
        return self.database_url.startswith("sqlite:")


@dataclass(frozen=True)
class FileRef:
    """A file the configuration names: where in the document (e.g. ("partners", 0, "smime_cert")), and which."""

    key: tuple[str | int, ...]
    path: Path


class _Reader:
    """Walks one TOML table, remembering which keys were read so unknown ones can be refused."""

    def __init__(
        self,
        file: Path,
        prefix: str,
        table: dict[str, Any],
        refs: list[FileRef] | None = None,
        where: tuple[str | int, ...] = (),
    ) -> None:
        self.file = file
        self.prefix = prefix
        self.table = table
        self.seen: set[str] = set()
        self.refs: list[FileRef] = [] if refs is None else refs  # every file the configuration names
        self.where = where  # this table's place in the document

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(str(self.file), self.key(name), problem)

    def get(
        self,
        name: str,
        kind: type[T] | tuple[type, ...],
        default: Any = ...,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        self.seen.add(name)
        if name not in self.table:
            if default is ...:
                raise self.fail(name, "missing (required)")
            return default
        value = self.table[name]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.fail(name, f"must be a number, not {value!r}")
        if not isinstance(value, kind):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(name, f"must be {want}, not {type(value).__name__}")
        if check is not None and (problem := check(value)) is not None:
            raise self.fail(name, problem)
        return value

    def path(self, name: str, default: Any = ..., must_exist: bool = True) -> Path:
        raw = self.get(name, str, default)
        p = Path(raw)
        if not p.is_absolute():
            p = (self.file.parent / p).resolve()
        if must_exist and not p.exists():
            raise self.fail(name, f"file not found: {p}")
        if must_exist:
            self.refs.append(FileRef((*self.where, name), p))
        return p

    def within(self, name: str | int, prefix: str, table: dict[str, Any]) -> _Reader:
        """A reader for a table inside this one (sharing the record of file references)."""
        return _Reader(self.file, prefix, table, self.refs, (*self.where, name))

    def table_of(self, name: str, required: bool = True) -> _Reader:
        self.seen.add(name)
        value = self.table.get(name)
        if value is None:
            if required:
                raise self.fail(name, "missing section")
            value = {}
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table")
        return self.within(name, self.key(name), value)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self.fail(unknown[0], "unknown key (typo?)")


def parse_size(text: str | int) -> int:
    """'20MB' / '512k' / 1048576 → bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(float(m.group(1)) * factor)


def _check_ae(value: str) -> str | None:
    return (
        None
        if _AE_RE.match(value) and value == value.strip()
        else "not a valid AE title (1-16 chars, no backslash)"
    )


def _check_name(value: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value) else "use letters, digits, . _ -"


def _check_addr(value: str) -> str | None:
    return None if _ADDR_RE.match(value) else "not a mail address"


def _check_positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _nodes(r: _Reader, name: str, default_port: int) -> tuple[Node, ...]:
    raw = r.get(name, list)
    if not raw:
        raise r.fail(name, "needs at least one node")
    nodes = []
    for item in raw:
        if not isinstance(item, str) or not item.strip():
            raise r.fail(name, f"entry {item!r} is not 'host' or 'host:port'")
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not port.isdigit() or not (0 < int(port) < 65536):
            if port:
                raise r.fail(name, f"entry {item!r} has a bad port")
            port = str(default_port)
        nodes.append(Node(host, int(port)))
    return tuple(nodes)


def _parse_size_key(r: _Reader, name: str, default: str) -> int:
    raw = r.get(name, (str, int), default)
    try:
        size = parse_size(raw)
    except ValueError as exc:
        raise r.fail(name, str(exc)) from None
    if size < 64 * 1024:
        raise r.fail(name, "must be at least 64KB")
    return size


def _partner(p: _Reader, file: Path) -> Partner:
    """One [[partners]] entry; key material is checked by `gateway.addressbook` when the gateway starts."""
    name = p.get("name", str, check=_check_name)
    if "address" in p.table and "addresses" in p.table:
        raise p.fail("addresses", "give address or addresses, not both")
    if "addresses" in p.table:
        addresses = p.get("addresses", list)
        if not addresses:
            raise p.fail("addresses", "needs at least one address")
        for a in addresses:
            if not isinstance(a, str) or _check_addr(a):
                raise p.fail("addresses", f"entry {a!r} is not a mail address")
    else:
        addresses = [p.get("address", str, check=_check_addr)]
    fmt = p.get(
        "format", str, "smime", check=lambda v: None if v in formats.names() else " or ".join(formats.names())
    )
    smime_cert = p.path("smime_cert") if "smime_cert" in p.table else None
    pgp_key = p.path("pgp_key") if "pgp_key" in p.table else None
    fingerprint = p.get(
        "pgp_fingerprint",
        str,
        "",
        check=lambda v: (
            None
            if re.fullmatch(r"[0-9A-Fa-f]{40}", v.replace(" ", ""))
            else "40 hex digits (a v4 fingerprint)"
        ),
    )
    needs = formats.get(fmt).key
    if needs == "smime" and smime_cert is None:
        raise p.fail("smime_cert", f"missing: partner {name!r} uses {fmt} and needs its S/MIME certificate")
    if needs == "pgp" and pgp_key is None:
        raise p.fail(
            "pgp_key", f"missing: partner {name!r} uses {fmt} and needs its OpenPGP public key (armored file)"
        )
    size = p.get("max_mail_size", (str, int), 0)
    max_message = p.get("max_message_size", (str, int), "200MB")
    try:
        size = parse_size(size) if size else 0
        max_message = parse_size(max_message)
    except ValueError as exc:
        raise p.fail("max_mail_size", str(exc)) from None
    if size and size < 64 * 1024:
        raise p.fail("max_mail_size", "must be at least 64KB")
    return Partner(
        name=name,
        addresses=tuple(addresses),
        ae_title=p.get("ae_title", str, check=_check_ae),
        format=fmt,
        smime_cert=smime_cert,
        pgp_key=pgp_key,
        pgp_fingerprint=fingerprint.replace(" ", "").upper(),
        institution=p.get("institution", str, ""),
        location=p.get("location", str, ""),
        max_mail_size=size,
        compression=p.get(
            "compression",
            str,
            "none",
            check=lambda v: None if v in COMPRESSIONS else " or ".join(COMPRESSIONS),
        ),
        receipts=p.get("receipts", bool, True),
        split=p.get("split", str, "sets", check=lambda v: None if v in SPLITS else " or ".join(SPLITS)),
        max_message_size=max_message,
    )


def load(path: str | Path) -> Settings:
    """Read and validate a configuration file; raise `ConfigError` naming file and key."""
    file = Path(path).resolve()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(file), "-", "configuration file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file), "-", f"not valid TOML: {exc}") from None
    return from_dict(data, file)


def from_dict(data: dict[str, Any], file: Path) -> Settings:
    """Validate an already parsed TOML document (used by `load` and by tests)."""
    root = _Reader(file, "", data)

    gw = root.table_of("gateway")
    name = gw.get(
        "name",
        str,
        check=_check_name,
    )
    ae_title = gw.get("ae_title", str, check=_check_ae)
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
    retry_max_age = float(gw.get("retry_max_age", (int, float), 2 * 24 * 3600, check=_check_positive))
    allowed_ae_raw = gw.get("allowed_calling_ae", list, [])
    for item in allowed_ae_raw:
        if not isinstance(item, str) or _check_ae(item) is not None:
            raise gw.fail("allowed_calling_ae", f"entry {item!r} is not a valid AE title")
    networks = []
    for item in gw.get("allowed_networks", list, []):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise gw.fail("allowed_networks", f"entry {item!r} is not an address or network (CIDR)") from None
    open_to_any_peer = gw.get("open_to_any_peer", bool, False)
    if not _is_loopback(dicom_bind) and not allowed_ae_raw and not networks and not open_to_any_peer:
        # any host that reaches the port could have us sign and mail a study to any partner: an open relay
        raise gw.fail(
            "dicom_bind",
            f"{dicom_bind} reaches beyond this machine, and allowed_networks and allowed_calling_ae are both "
            "empty: name the modalities' networks or AE titles (or set open_to_any_peer = true)",
        )
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
    dicom_timeout = float(gw.get("dicom_timeout", (int, float), 60, check=_check_positive))
    dicom_workers = int(
        gw.get(
            "dicom_workers",
            int,
            max(1, min(8, os.cpu_count() or 1)),
            check=lambda v: None if 1 <= v <= 64 else "must be between 1 and 64",
        )
    )
    gw.done()

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

    db = root.table_of("database", required=False)
    database_url = db.get(
        "url",
        str,
        f"sqlite:///{d_root / 'catalog.sqlite'}",
        check=lambda v: (
            None if v.startswith(("sqlite:///", "mysql://")) else "must start with sqlite:/// or mysql://"
        ),
    )
    db.done()
    if database_url.startswith("sqlite:///") and not Path(database_url[len("sqlite:///") :]).is_absolute():
        database_url = f"sqlite:///{(file.parent / database_url[len('sqlite:///') :]).resolve()}"

    m = root.table_of("mail")
    mail = MailSettings(
        address=m.get("address", str, check=_check_addr),
        client_cert=m.path("client_cert"),
        client_key=m.path("client_key"),
        ca_bundle=m.path("ca_bundle"),
        smtp_nodes=_nodes(m, "smtp_nodes", 25),
        pop3_nodes=_nodes(m, "pop3_nodes", 995),
        poll_interval=float(m.get("poll_interval", (int, float), 10, check=_check_positive)),
        max_mail_size=_parse_size_key(m, "max_mail_size", "20MB"),
        connect_timeout=float(m.get("connect_timeout", (int, float), 15, check=_check_positive)),
        io_timeout=float(m.get("io_timeout", (int, float), 120, check=_check_positive)),
        node_cooldown=float(
            m.get("node_cooldown", (int, float), 60, check=lambda v: None if v >= 0 else "must be >= 0")
        ),
        subject=m.get("subject", str, "DICOM-eMail"),
        retry_base=float(m.get("retry_base", (int, float), 30, check=_check_positive)),
        retry_cap=float(m.get("retry_cap", (int, float), 300, check=_check_positive)),
        protocol=m.get(
            "protocol", str, "pop3", check=lambda v: None if v in ("pop3", "imap") else "pop3 or imap"
        ),
        imap_nodes=_nodes(m, "imap_nodes", 993) if "imap_nodes" in m.table else (),
        imap_user=m.get("imap_user", str, ""),
        imap_password_env=m.get("imap_password_env", str, ""),
        imap_folder=m.get("imap_folder", str, "INBOX"),
        reassembly_deadline=float(
            m.get("reassembly_deadline", (int, float), 24 * 3600, check=_check_positive)
        ),
        receipt_deadline=float(m.get("receipt_deadline", (int, float), 24 * 3600, check=_check_positive)),
        max_unpacked_size=_parse_size_key(m, "max_unpacked_size", "1GB"),
        max_fetch_size=_parse_size_key(m, "max_fetch_size", "0") if "max_fetch_size" in m.table else 0,
        max_inbox_backlog=_parse_size_key(m, "max_inbox_backlog", "1GB"),
        untrusted_quota=_parse_size_key(m, "untrusted_quota", "2GB"),
        untrusted_quota_per_sender=_parse_size_key(m, "untrusted_quota_per_sender", "1GB"),
        receipt_pacs_deadline=float(m.get("receipt_pacs_deadline", (int, float), 900, check=_check_positive)),
        negative_receipts_per_hour=m.get(
            "negative_receipts_per_hour", int, 20, check=lambda v: None if v >= 0 else "must be >= 0"
        ),
    )
    if mail.protocol == "imap" and not mail.imap_nodes:
        raise m.fail("imap_nodes", "protocol = imap needs at least one IMAPS node")
    m.done()

    sm = root.table_of("smime")
    smime_cert = sm.path("cert")
    smime_key = sm.path("key")
    sm.done()

    pgp = None
    if "pgp" in data:
        pg = root.table_of("pgp")
        pgp = PgpSettings(key=pg.path("key"), passphrase_env=pg.get("passphrase_env", str, ""))
        pg.done()

    bk = root.table_of("backup", required=False)

    def _check_time(v: str) -> str | None:
        return None if re.fullmatch(r"([01]?\d|2[0-3]):[0-5]\d", v) else "must be HH:MM (local time)"

    hh, mm = bk.get("time", str, "02:00", check=_check_time).split(":")
    backup = BackupSettings(
        time=dt.time(int(hh), int(mm)),
        keep_days=float(bk.get("keep_days", (int, float), 5, check=_check_positive)),
        copy_to=bk.get("copy_to", str, ""),
        include_private_keys=bk.get("include_private_keys", bool, False),
        passphrase_env=bk.get("passphrase_env", str, "DMG_BACKUP_PASSPHRASE"),
    )
    bk.done()

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
    )
    if web.requires_tls and web.port and (web.tls_cert is None or web.tls_key is None):
        raise w.fail(
            "bind", "a non-loopback address needs tls_cert and tls_key (and a password, see password_env)"
        )
    w.done()

    pacs_nodes: list[Pacs] = []
    for i, entry in enumerate(root.get("pacs", list, [])):
        if not isinstance(entry, dict):
            raise root.fail(f"pacs[{i}]", "must be a table ([[pacs]])")
        pr = root.within("pacs", f"pacs[{i}]", entry).within(i, f"pacs[{i}]", entry)
        node = Pacs(
            name=pr.get(
                "name",
                str,
                check=_check_name,
            ),
            host=pr.get("host", str),
            port=pr.get("port", int, check=lambda v: None if 0 < v < 65536 else "not a port"),
            ae_title=pr.get("ae_title", str, check=_check_ae),
            calling_ae=pr.get("calling_ae", str, ae_title, check=_check_ae),
            max_attempts=pr.get(
                "max_attempts", int, 5, check=lambda v: None if v >= 1 else "must be at least 1"
            ),
            retry_base=float(pr.get("retry_base", (int, float), 30, check=_check_positive)),
            timeout=float(pr.get("timeout", (int, float), 30, check=_check_positive)),
            associations=pr.get(
                "associations", int, 2, check=lambda v: None if 1 <= v <= 16 else "must be between 1 and 16"
            ),
            tls_ca=pr.path("tls_ca") if "tls_ca" in entry else None,
            tls_cert=pr.path("tls_cert") if "tls_cert" in entry else None,
            tls_key=pr.path("tls_key") if "tls_key" in entry else None,
        )
        if (node.tls_cert is None) != (node.tls_key is None) or (node.tls_cert and not node.tls_ca):
            raise pr.fail(
                "tls_cert", "DICOM TLS needs tls_ca, and tls_cert with tls_key for a client certificate"
            )
        pr.done()
        if any(other.name == node.name for other in pacs_nodes):
            raise pr.fail("name", f"duplicate PACS name {node.name!r}")
        pacs_nodes.append(node)

    partners_raw = root.get("partners", list, [])
    partners: list[Partner] = []
    for i, entry in enumerate(partners_raw):
        if not isinstance(entry, dict):
            raise root.fail(f"partners[{i}]", "must be a table ([[partners]])")
        p = root.within("partners", f"partners[{i}]", entry).within(i, f"partners[{i}]", entry)
        partner = _partner(p, file)
        p.done()
        for other in partners:
            if other.name == partner.name:
                raise p.fail("name", f"duplicate partner name {partner.name!r}")
            if other.ae_title == partner.ae_title:
                raise p.fail("ae_title", f"AE title {partner.ae_title!r} already routes to {other.name!r}")
            if shared := set(map(str.lower, other.addresses)) & set(map(str.lower, partner.addresses)):
                raise p.fail("addresses", f"{sorted(shared)[0]} already belongs to {other.name!r}")
        if partner.ae_title == ae_title:
            raise p.fail("ae_title", "must differ from gateway.ae_title")
        if formats.get(partner.format).key == "pgp" and pgp is None:
            raise p.fail(
                "format",
                f"partner {partner.name!r} uses {partner.format}: the [pgp] section (own key) is missing",
            )
        partners.append(partner)
    root.done()

    return Settings(
        file_refs=tuple(root.refs),
        source=file,
        name=name,
        ae_title=ae_title,
        dicom_bind=dicom_bind,
        dicom_port=dicom_port,
        stability_delay=stability_delay,
        d_root=d_root,
        e_root=e_root,
        min_free=min_free,
        min_free_inodes=min_free_inodes,
        database_url=database_url,
        mail=mail,
        smime_cert=smime_cert,
        smime_key=smime_key,
        partners=tuple(partners),
        pgp=pgp,
        log_level=log_level,
        retry_max_age=retry_max_age,
        allowed_calling_ae=tuple(allowed_ae_raw),
        allowed_networks=tuple(networks),
        dicom_timeout=dicom_timeout,
        dicom_workers=dicom_workers,
        dicom_tls=dicom_tls,
        backup=backup,
        monitoring=monitoring,
        web=web,
        pacs=tuple(pacs_nodes),
        keep_days_after_pacs=keep_days_after_pacs,
    )
