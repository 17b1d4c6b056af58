"""A real Audit Record Repository for the tests: rsyslog receiving RFC 5424 over TLS (RFC 5425) with client
certificates (its `ossl` stream driver, `x509/certvalid`), writing each message's structured data and text as one
line of a file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from gateway.devtools.ports import free_port


class AuditRepository:
    """rsyslogd on 127.0.0.1:`port`, started and stopped by the test."""

    def __init__(self, folder: Path, pki_dir: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.out = folder / "audit.log"
        self.pid_file = folder / "rsyslogd.pid"
        (folder / "work").mkdir(parents=True, exist_ok=True)
        self.conf = folder / "rsyslog.conf"
        self.conf.write_text(
            f"""global(
  workDirectory="{folder / "work"}"
  maxMessageSize="64k"
  DefaultNetstreamDriver="ossl"
  DefaultNetstreamDriverCAFile="{pki_dir / "ca.pem"}"
  DefaultNetstreamDriverCertFile="{pki_dir / "mail-server.pem"}"
  DefaultNetstreamDriverKeyFile="{pki_dir / "mail-server.key"}"
)
module(load="imtcp" StreamDriver.Name="ossl" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" port="{self.port}" address="127.0.0.1")
template(name="audit" type="string" string="%app-name% %structured-data% %msg%\\n")
*.* action(type="omfile" file="{self.out}" template="audit" flushOnTXEnd="on")
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        self.pid_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.pid_file)],
            stdout=(self.folder / "rsyslogd.out").open("ab"),
            stderr=subprocess.STDOUT,
        )
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise RuntimeError(f"rsyslogd did not start: {(self.folder / 'rsyslogd.out').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        self.proc = None

    def messages(self) -> list[tuple[str, int, bool, str]]:
        """(app name, seq, marked resent, XML) of every message received so far."""
        return [(app, seq, resent, xml) for app, seq, resent, _, xml in self.marked()]

    def marked(self) -> list[tuple[str, int, bool, bool, str]]:
        """(app name, seq, marked resent, marked replayed after a crash, XML) of every message received so far."""
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text(encoding="utf-8", errors="replace").splitlines():
            m = re.match(
                r'(\S+) \[dmg@32473 seq="(\d+)"( resent="1")?( replay="1")?\] \W*(<AuditMessage.*</AuditMessage>)',
                line,
            )
            if m:
                found.append((m[1], int(m[2]), bool(m[3]), bool(m[4]), m[5]))
        return found
