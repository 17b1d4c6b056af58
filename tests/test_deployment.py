"""The deployment files users run: the compose file validates, the example configuration loads."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from gateway.devtools.devenv import render_config
from gateway.devtools.studies import make_study
from tests.conftest import storescu, wait_for
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_docker_compose_file_is_valid():  # type: ignore[no-untyped-def]
    r = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "gateway:" in r.stdout and "mariadb:" in r.stdout and "healthz" in r.stdout


def test_systemd_unit_runs_the_gateway_hardened():  # type: ignore[no-untyped-def]
    unit = (ROOT / "contrib" / "systemd" / "dicom-mail-gateway.service").read_text()
    assert "ExecStart=/opt/dicom-mail-gateway/.venv/bin/dicom-mail-gateway run -c" in unit
    for option in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ):
        assert option in unit


PODMAN = [
    "podman",
    "--runtime",
    "runc",  # crun refuses this machine's hybrid cgroup hierarchy
]
RUN_OPTS = ["--network", "host", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]


def _podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def _base_image() -> str:
    """A Debian bookworm image with Python 3.11, made from Debian's own packages (Docker Hub is out of reach
    here): the same distribution as python:3.11-slim-bookworm, and this network's CA bundle for its TLS proxy."""
    name = "localhost/dmg-test-base:bookworm"
    if _podman("image", "exists", name).returncode == 0:
        return name
    with tempfile.TemporaryDirectory() as tmp:
        pip_conf = Path(tmp) / "pip.conf"
        pip_conf.write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        tar = Path(tmp) / "rootfs.tar"
        subprocess.run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=python3,ca-certificates",
                "--customize-hook=upload /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt",
                f"--customize-hook=upload {pip_conf} /etc/pip.conf",
                "bookworm",
                str(tar),
                "http://deb.debian.org/debian",
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
        r = _podman("import", str(tar), name)
        assert r.returncode == 0, r.stderr
    return name


def test_the_container_image_runs_the_gateway_as_documented(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """The Dockerfile, built with podman on a Debian bookworm base: root-owned bind mounts for D: and E: become
    the gateway user's, the gateway runs as uid 10001 (never root), GnuPG is there, and the containerised gateway
    sends a study as PGP/MIME through the real mail cluster to a gateway on the host; a backup lands on E:."""
    r = _podman(
        "build",
        *RUN_OPTS,
        "--build-arg",
        f"BASE={_base_image()}",
        "-t",
        "localhost/dicom-mail-gateway:test",
        str(ROOT),
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _podman(
        "run", "--rm", *RUN_OPTS, "--entrypoint", "gpg", "localhost/dicom-mail-gateway:test", "--version"
    )
    assert r.returncode == 0 and "GnuPG" in r.stdout

    # what an operator puts beside the compose file: config/ (readable by uid 10001), volumes/d and volumes/e
    config_dir, d, e = tmp_path / "config", tmp_path / "volumes" / "d", tmp_path / "volumes" / "e"
    shutil.copytree(pki_dir, config_dir)
    port = free_port()
    text = render_config(
        name="gateway-a",
        ae_title="GATEWAY_A",
        port=port,
        d_root=Path("/data/d"),
        e_root=Path("/data/e"),
        pki_dir=pki_dir,
        partners=[("gateway-b", "gateway-b", "TO_B")],
        stability_delay=1,
        partner_extra={"gateway-b": 'format = "pgp"'},
    )
    (config_dir / "gateway.toml").write_text(text.replace(str(pki_dir), "/etc/dicom-mail-gateway"))
    subprocess.run(["chown", "-R", "10001:10001", str(config_dir)], check=True)
    d.mkdir(parents=True)
    e.mkdir(parents=True)  # created by root, as `docker compose up` does for missing bind-mount folders
    b = make_gateway(
        "gateway-b",
        [("gateway-a", "gateway-a", "TO_A")],
        poll_interval=1,
        partner_extra={"gateway-a": 'format = "pgp"'},
    )
    b.start()
    name = f"dmg-test-{port}"
    r = _podman(
        "run",
        "-d",
        "--name",
        name,
        *RUN_OPTS,
        "-v",
        f"{d}:/data/d",
        "-v",
        f"{e}:/data/e",
        "-v",
        f"{config_dir}:/etc/dicom-mail-gateway:ro",
        "-e",
        "DMG_WEB_PASSWORD=container-test-password",
        "localhost/dicom-mail-gateway:test",
    )
    assert r.returncode == 0, r.stderr
    try:
        wait_for(lambda: _accepts(port), 120, 0.5, "the containerised gateway's DICOM port")
        assert "Uid:\t10001" in _podman("exec", name, "cat", "/proc/1/status").stdout, "never runs as root"
        assert d.stat().st_uid == 10001 and e.stat().st_uid == 10001
        make_study(tmp_path / "s", ct=2, mr=1, sc=0, size=16)
        assert storescu(port, "TO_B", tmp_path / "s").returncode == 0
        wait_for(
            lambda: any(
                t["direction"] == "in" and t["state"] == "complete"
                for t in json.loads(b.cli("status", "--json"))["transfers"]
            ),
            120,
            1,
            "the study from the container at the host's gateway",
        )
        r = _podman(
            "exec",
            "--user",
            "gateway",
            name,
            "dicom-mail-gateway",
            "backup",
            "-c",
            "/etc/dicom-mail-gateway/gateway.toml",
        )
        assert r.returncode == 0, r.stderr
        assert [p for p in (e / "backup").iterdir() if p.is_dir()], "a backup set on E:"
        assert all(p.stat().st_uid == 10001 for p in d.rglob("*")), (
            "everything on D: belongs to the gateway user"
        )
    finally:
        logs = _podman("logs", name).stderr
        _podman("rm", "-f", name)
    assert "Traceback" not in logs, logs[-3000:]


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0
