"""The deployment files users run: the compose file validates, the example configuration loads."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
