"""The configuration's model: frozen dataclasses, one per section, and `Settings`, which holds them all."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.coerce import CoercionRule
from gateway.core.deid import DeidSettings
from gateway.core.routing import Exclusion, RuleSet


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
    exclude: tuple[Exclusion, ...] = ()  # instances never sent to this partner (gateway.core.routing)
    coerce: CoercionRule | None = None  # its patient IDs on the way into the local PACS (gateway.core.coerce)
    deidentify: DeidSettings | None = None  # what it gets is de-identified (gateway.core.deid)

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
    storage_commitment: bool = False  # ask it to commit what it stored (N-ACTION); only then "accepted"
    commitment_timeout: float = 600.0  # how long a requested commitment may take before it is asked again
    commitment_batch: int = 500  # instances per N-ACTION (Orthanc slows down quadratically beyond that)
    commitment_hold: float = 10.0  # how long the association waits for a report on itself


@dataclass(frozen=True)
class BackupSettings:
    """The nightly backup to e_root/backup."""

    time: dt.time = dt.time(2, 0)
    keep_days: float = 5.0
    copy_to: str = ""
    include_private_keys: bool = False
    passphrase_env: str = "DMG_BACKUP_PASSPHRASE"


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail's repository (IHE ATNA: syslog over TLS); the local copy on E: is always kept."""

    repository: Node | None = None  # None: the local copy only
    tls_ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    app_name: str = "dicom-mail-gateway"


@dataclass(frozen=True)
class ClusterSettings:
    """[cluster]: this gateway is one node of several sharing one Galera catalog and one D: (docs/cluster.md)."""

    node: str  # this node's name, unique in the cluster
    lease: float = 30.0  # a claim not renewed for this long may be taken over by another node
    heartbeat: float = 10.0  # how often the node renews its claims and says it is alive
    minority_grace: float = 60.0  # catalog unreachable this long: the DICOM port closes (the VIP moves on)


def is_loopback(bind: str) -> bool:
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
    token_env: str = (
        "DMG_WEB_TOKENS"  # environment variable with bearer tokens for API clients (comma-separated)
    )
    cors_origins: tuple[str, ...] = ()  # other origins whose pages may use DICOMweb (e.g. an OHIF elsewhere)
    stow_max_size: int = 4 * 1024**3  # the largest STOW-RS request body
    render_workers: int = 2  # processes that decode pixel data for viewers (gateway.renderers)
    render_timeout: float = 30.0  # seconds one image may take before its worker is replaced
    render_memory: int = 3 * 1024**3  # address space of a render worker (a hostile image cannot take more)

    @property
    def requires_tls(self) -> bool:
        """Bound to anything but loopback: TLS is required (the password must not cross a network in clear)."""
        return not is_loopback(self.bind)

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
    routing: RuleSet = field(default_factory=RuleSet)
    audit: AuditSettings = field(default_factory=AuditSettings)
    cluster: ClusterSettings | None = None  # None: the one gateway on its D: (the default)
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
    def audit_dir(self) -> Path:
        """This gateway's audit trail on E:: `audit/`, or a cluster node's `audit/<node>/` (one chain, one writer)."""
        return self.e_root / "audit" / self.node if self.cluster is not None else self.e_root / "audit"

    @property
    def node(self) -> str:
        """This gateway's name in its cluster ("" when it runs alone)."""
        return self.cluster.node if self.cluster is not None else ""

    @property
    def catalog_is_sqlite(self) -> bool:
        """True when the catalog is the embedded SQLite database."""
        return self.database_url.startswith("sqlite:")


@dataclass(frozen=True)
class FileRef:
    """A file the configuration names: where in the document (e.g. ("partners", 0, "smime_cert")), and which."""

    key: tuple[str | int, ...]
    path: Path
