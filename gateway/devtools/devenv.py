"""The development environment behind `dicom-mail-gateway dev`: dev certificates in `certs/dev/`, the local mail
cluster, storage under `storage/`, and a configuration whose only partner is the gateway itself (loopback), so
that a study sent to it goes out by mail and comes back into the same gateway.

`render_config` is also what the tests use to write gateway configurations.
"""

from __future__ import annotations

from pathlib import Path

from gateway.devtools import pki
from gateway.devtools.mailcluster import NODE_COUNT, MailCluster, node_ip
from gateway.devtools.ports import free_port
from gateway.devtools.process import GatewayProcess


def _q(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(
    *,
    name: str,
    ae_title: str,
    port: int,
    d_root: Path,
    e_root: Path,
    pki_dir: Path,
    partners: list[tuple[str, str, str]],
    database_url: str | None = None,
    stability_delay: float = 5,
    poll_interval: float = 2,
    max_mail_size: str = "20MB",
    smtp_nodes: list[str] | None = None,
    pop3_nodes: list[str] | None = None,
    tls_stem: str | None = None,
    node_cooldown: float = 30,
    retry_base: float = 30,
    min_free: str = "64MB",
    min_free_inodes: int = 1000,
    gateway_extra: str = "",
    tail: str = "",
    web_port: int = 0,
    web_extra: str = "",
    mail_extra: str = "",
    partner_extra: dict[str, str] | None = None,
) -> str:
    """A gateway configuration for the dev PKI; partners are (name, gateway name for certs, AE title).

    A partner's gateway name may carry an address extension ("gateway-b+pgp"): the same mailbox and keys under
    another address, so one receiving gateway can stand for several partners.

    `partner_extra` adds TOML lines to a partner's table (format, compression, …); a partner with
    `format = "pgp"` gets its OpenPGP key from the dev PKI.


    Size: a configuration template, one key per line.
    """
    smtp = smtp_nodes or [f"{node_ip(n)}:25" for n in range(1, NODE_COUNT + 1)]
    pop3 = pop3_nodes or [f"{node_ip(n)}:995" for n in range(1, NODE_COUNT + 1)]
    tls = tls_stem or f"{name}-tls"
    lines = [
        "[gateway]",
        f"name = {_q(name)}",
        f"ae_title = {_q(ae_title)}",
        'dicom_bind = "127.0.0.1"',
        f"dicom_port = {port}",
        f"stability_delay = {stability_delay}",
        gateway_extra,
        "",
        "[storage]",
        f"d_root = {_q(d_root)}",
        f"e_root = {_q(e_root)}",
        f"min_free = {_q(min_free)}",
        f"min_free_inodes = {min_free_inodes}",
        "",
    ]
    if database_url:
        lines += ["[database]", f"url = {_q(database_url)}", ""]
    lines += [
        "[mail]",
        f"address = {_q(pki.address_of(name))}",
        f"client_cert = {_q(pki_dir / f'{tls}.pem')}",
        f"client_key = {_q(pki_dir / f'{tls}.key')}",
        f"ca_bundle = {_q(pki_dir / 'ca.pem')}",
        "smtp_nodes = [" + ", ".join(map(_q, smtp)) + "]",
        "pop3_nodes = [" + ", ".join(map(_q, pop3)) + "]",
        f"poll_interval = {poll_interval}",
        f"max_mail_size = {_q(max_mail_size)}",
        "connect_timeout = 5",
        "io_timeout = 30",
        f"node_cooldown = {node_cooldown}",
        f"retry_base = {retry_base}",
        mail_extra,
        "",
        "[smime]",
        f"cert = {_q(pki_dir / f'{name}-smime.pem')}",
        f"key = {_q(pki_dir / f'{name}-smime.key')}",
        "",
    ]
    if (pki_dir / f"{name}-pgp.sec.asc").exists():
        lines += ["[pgp]", f"key = {_q(pki_dir / f'{name}-pgp.sec.asc')}", ""]
    for partner_name, partner_gateway, partner_ae in partners:
        extra = (partner_extra or {}).get(partner_name, "")
        stem = partner_gateway.split("+")[0]  # "gateway-b+zip": gateway-b's mailbox with an address extension
        lines += [
            "[[partners]]",
            f"name = {_q(partner_name)}",
            f"address = {_q(pki.address_of(partner_gateway))}",
            f"smime_cert = {_q(pki_dir / f'{stem}-smime.pem')}",
            f"ae_title = {_q(partner_ae)}",
        ]
        if (pki_dir / f"{stem}-pgp.pub.asc").exists():
            lines.append(f"pgp_key = {_q(pki_dir / f'{stem}-pgp.pub.asc')}")
        lines += [extra, ""]
    lines += ["[web]", f"port = {web_port}", web_extra, ""]
    return "\n".join(lines) + ("\n" + tail if tail else "")


def gateway_process(
    folder: Path,
    site: str,
    pki_dir: Path,
    partners: list[tuple[str, str, str]],
    d_root: Path | None = None,
    e_root: Path | None = None,
    **settings: object,
) -> GatewayProcess:
    """One gateway of a test or benchmark, not yet started: its `gateway.toml` and log in `folder` (named for the
    process), on a free DICOM port. `site` is the gateway's name in the network (its mailbox and keys); the nodes of
    a cluster share it and their D: and E: (`d_root`, `e_root`, by default `folder/d` and `folder/e`), each with
    its own `folder` and `tail=cluster_table(...)`. `settings` are `render_config`'s."""
    port = free_port()
    d = d_root or folder / "d"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "gateway.toml"
    cfg.write_text(
        render_config(
            name=site,
            ae_title=site.upper().replace("-", "_"),
            port=port,
            d_root=d,
            e_root=e_root or folder / "e",
            pki_dir=pki_dir,
            partners=partners,
            **settings,  # type: ignore[arg-type]
        )
    )
    return GatewayProcess(folder.name, cfg, port, folder / "gateway.log", d)


def cluster_table(node: str, lease: float) -> str:
    """The `[cluster]` table of one node (docs/cluster.md), for tests and benchmarks: a short lease, so that
    take-over happens within their patience."""
    return f'\n[cluster]\nnode = "{node}"\nlease = {lease}\nheartbeat = {lease / 3}\n'


def prepare(root: Path, port: int = 11112) -> Path:
    """Certificates, mail cluster, storage folders and `.dev/gateway.toml`; returns the configuration path."""
    pki_dir = root / "certs" / "dev"
    pki.make_dev_pki(pki_dir, ["gateway-a", "gateway-b"])
    MailCluster(root / ".dev" / "mailcluster").up(pki_dir, ["gateway-a", "gateway-b"])
    cfg = root / ".dev" / "gateway.toml"
    cfg.write_text(
        render_config(
            name="gateway-a",
            ae_title="DMG_DEV",
            port=port,
            d_root=root / "storage" / "d",
            e_root=root / "storage" / "e",
            pki_dir=pki_dir,
            partners=[("loopback", "gateway-a", "LOOPBACK")],
            web_port=8080,
        )
    )
    return cfg
