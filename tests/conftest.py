"""Fixtures on real peers: the local Postfix + Dovecot cluster, MariaDB, gateway processes, DICOM studies."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pymysql
import pytest

from gateway.devtools import pki
from gateway.devtools.devenv import render_config
from gateway.devtools.mailcluster import MailCluster

ROOT = Path(__file__).resolve().parents[1]
CANARIES = (b"CANARYZQX", b"PATIENTJWV", b"PIDCANARY7731", b"19230417")


@pytest.fixture(scope="session")
def pki_dir() -> Path:
    """The dev PKI (CA, mail server, gateway-a/b TLS and S/MIME certs, rogue look-alikes)."""
    folder = ROOT / "certs" / "dev"
    pki.make_dev_pki(folder, ["gateway-a", "gateway-b", "gateway-c", "ghost"])
    return folder


@pytest.fixture(scope="session")
def cluster(pki_dir: Path) -> Iterator[MailCluster]:
    """The real mail cluster, shared by the session; every node is up again after each test."""
    mc = MailCluster(ROOT / ".dev" / "mailcluster")
    mc.up(pki_dir, ["gateway-a", "gateway-b", "gateway-c"])
    yield mc


@pytest.fixture
def mail(cluster: MailCluster) -> Iterator[MailCluster]:
    """The cluster with empty mailboxes and all nodes up, restored after the test."""
    cluster.drain()
    yield cluster
    state = cluster._state()
    down = sorted(set(state["down_smtp"]) | set(state["down_pop3"]))
    if down:
        cluster.set_nodes(down, up=True)
    cluster.drain()


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A database of its own on the machine's MariaDB, dropped afterwards."""
    name = f"dmg_test_{secrets.token_hex(4)}"
    yield f"mysql://root@127.0.0.1:3306/{name}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProcess:
    """A gateway running as its own process, as an operator runs it."""

    name: str
    config: Path
    port: int
    log: Path
    d_root: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not open its DICOM port: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def cli(self, *args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "gateway", *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout


@pytest.fixture
def make_gateway(tmp_path: Path, pki_dir: Path) -> Iterator:  # type: ignore[type-arg]
    """Factory: write a configuration for gateway `name` and return a (not yet started) process."""
    made: list[GatewayProcess] = []

    def factory(name: str, partners: list[tuple[str, str, str]], **kw: object) -> GatewayProcess:
        port = free_port()
        d_root = Path(str(kw.pop("d_root", tmp_path / name / "d")))
        cfg = tmp_path / name / "gateway.toml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(
            render_config(
                name=name,
                ae_title=name.upper().replace("-", "_"),
                port=port,
                d_root=d_root,
                e_root=tmp_path / name / "e",
                pki_dir=pki_dir,
                partners=partners,
                **kw,  # type: ignore[arg-type]
            )
        )
        gw = GatewayProcess(name, cfg, port, tmp_path / name / "gateway.log", d_root)
        made.append(gw)
        return gw

    yield factory
    for gw in made:
        gw.stop()


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def storescu(port: int, called_ae: str, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, a real modality client, with TCP_NODELAY (see notes/perf-anchors.md)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [
            "storescu",
            "-xr",
            "-aet",
            "MODALITY",
            "-aec",
            called_ae,
            *extra,
            "127.0.0.1",
            str(port),
            "+sd",
            str(folder),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
