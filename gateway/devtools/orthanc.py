"""A real Orthanc PACS on loopback with a configuration of its own (tests and benchmarks)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.devtools.ports import free_port


@dataclass
class Orthanc:
    """A running Orthanc: its DICOM and HTTP ports; `stop()` ends it."""

    proc: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int

    def rest(self, path: str) -> bytes:
        """GET from Orthanc's REST API."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return r.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def start(
    folder: Path, extra: dict[str, Any] | None = None, timeout: float = 60, dicom_port: int | None = None
) -> Orthanc:
    """Start Orthanc (AE ORTHANC, TCP_NODELAY, no authentication, loopback only) and wait for its REST API."""
    dicom_port, http_port = dicom_port or free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "dmg-peer",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "StorageCompression": False,
        **(extra or {}),
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with (folder / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen(
            ["Orthanc", str(folder / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    peer = Orthanc(proc, dicom_port, http_port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            peer.rest("/system")
            return peer
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    peer.stop()
    raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}")
