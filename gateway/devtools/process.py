"""A gateway as its own process, as an operator runs it: started, SIGKILLed, stopped (tests and the kill test)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class GatewayProcess:
    """`python -m gateway run -c config`, with its log in a file."""

    name: str
    config: Path
    port: int
    log: Path
    d_root: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        """Start and wait until the DICOM port accepts connections."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not open its DICOM port: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop within 15 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def cli(self, *args: str) -> str:
        """Run a `dicom-mail-gateway` command against this gateway's configuration; return its output."""
        r = subprocess.run(
            [sys.executable, "-m", "gateway", *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {r.stderr[-2000:]}")
        return r.stdout
