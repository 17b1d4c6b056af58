"""The configuration: one TOML file becomes one frozen `Settings`, validated once at start-up.

Every error names the file and the dotted key (`ConfigError`). Relative paths are resolved against the
directory of the configuration file, so a configuration can be moved together with its certificates.
`gateway.example.toml` documents every key. The model is in `model.py`, the checked reading in `reader.py`, and
one function per section in `sections.py`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from gateway.config.model import (
    COMPRESSIONS,
    SPLITS,
    AuditSettings,
    BackupSettings,
    ClusterSettings,
    DicomTls,
    FileRef,
    MailSettings,
    MonitoringSettings,
    Node,
    Pacs,
    Partner,
    PgpSettings,
    Settings,
    WebSettings,
)
from gateway.config.partners import partners_section
from gateway.config.reader import Reader, parse_size
from gateway.config.routing import partner_exclusions, routing_section
from gateway.config.sections import (
    audit_section,
    backup_section,
    cluster_section,
    database_section,
    gateway_section,
    keys_section,
    mail_section,
    monitoring_section,
    pacs_section,
    storage_section,
    web_section,
)
from gateway.errors import ConfigError

__all__ = [
    "COMPRESSIONS",
    "SPLITS",
    "AuditSettings",
    "BackupSettings",
    "ClusterSettings",
    "ConfigError",
    "DicomTls",
    "FileRef",
    "MailSettings",
    "MonitoringSettings",
    "Node",
    "Pacs",
    "Partner",
    "PgpSettings",
    "Settings",
    "WebSettings",
    "from_dict",
    "load",
    "parse_size",
]


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
    root = Reader(file, "", data)
    gateway = gateway_section(root)
    storage = storage_section(root)
    database_url = database_section(root, storage["d_root"], file)
    mail = mail_section(root)
    smime_cert, smime_key, pgp = keys_section(root, data)
    backup = backup_section(root)
    monitoring = monitoring_section(root)
    audit = audit_section(root, mail)
    cluster = cluster_section(root, database_url)
    web = web_section(root)
    pacs = pacs_section(root, gateway["ae_title"])
    partners = partners_section(root, file, gateway["ae_title"], pgp)
    names = {x.name for x in pacs}
    for i, partner in enumerate(partners):
        if partner.coerce and partner.coerce.reconcile and partner.coerce.reconcile not in names:
            raise root.fail(
                f"partners[{i}].coerce.reconcile",
                f"no [[pacs]] named {partner.coerce.reconcile!r} to look patients up in",
            )
    routing = routing_section(
        root, [(p.name, p.ae_title) for p in partners], {p.name: partner_exclusions(p) for p in partners}
    )
    root.done()
    return Settings(
        file_refs=tuple(root.refs),
        source=file,
        **gateway,
        **storage,
        database_url=database_url,
        mail=mail,
        smime_cert=smime_cert,
        smime_key=smime_key,
        partners=partners,
        pgp=pgp,
        backup=backup,
        monitoring=monitoring,
        web=web,
        pacs=pacs,
        routing=routing,
        audit=audit,
        cluster=cluster,
    )
