"""The DICOM receiver processes: a receiver that dies is replaced without losing what it acknowledged, and no
receiver outlives the gateway."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.devtools.studies import make_study
from tests.conftest import GatewayProcess, storescu, wait_for
from tests.ports import free_port


def receivers_of(gw: GatewayProcess) -> list[int]:
    """PIDs of the gateway's receiver processes (its processes running gateway.stages.receivers)."""
    assert gw.proc is not None
    found = []
    for pid in descendants(gw.proc.pid):
        try:
            if b"gateway.stages.receivers" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return sorted(found)


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def indexed(gw: GatewayProcess) -> int:
    return sum(s["instances"] for s in json.loads(gw.cli("status", "--json"))["studies"])


@pytest.fixture
def gw(make_gateway) -> GatewayProcess:  # type: ignore[no-untyped-def]
    g = make_gateway("gateway-c", [("gateway-b", "gateway-b", "TO_B")], stability_delay=600)
    g.start()
    wait_for(lambda: len(receivers_of(g)) == 2, 20, 0.2, "two receiver processes")
    return g


def test_a_killed_receiver_is_replaced_and_loses_nothing(gw, tmp_path):  # type: ignore[no-untyped-def]
    make_study(tmp_path / "first", ct=6, mr=0, sc=0, size=32)
    assert storescu(gw.port, "TO_B", tmp_path / "first").returncode == 0
    before = receivers_of(gw)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(set(receivers_of(gw)) - set(before)) == 2, 30, 0.2, "two new receiver processes")
    make_study(tmp_path / "second", ct=5, mr=0, sc=0, size=32)
    r = storescu(gw.port, "TO_B", tmp_path / "second")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: indexed(gw) == 11, 30, 0.5, "every acknowledged instance in the catalog")
    assert "DICOM receiver 0 ended" in gw.log.read_text()


def test_no_child_process_outlives_a_killed_gateway(gw):  # type: ignore[no-untyped-def]
    assert gw.proc is not None
    children = descendants(gw.proc.pid)
    assert len(set(receivers_of(gw)) & children) == 2
    assert len(children) >= 5, children  # two receivers, the forkserver and its two mail-building workers
    gw.kill()

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in children)

    wait_for(gone, 10, 0.1, "the receivers and worker processes to die with the gateway")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_journals_of_a_crash_are_indexed_at_start(gw, tmp_path):  # type: ignore[no-untyped-def]
    make_study(tmp_path / "s", ct=4, mr=0, sc=0, size=32)
    assert storescu(gw.port, "TO_B", tmp_path / "s").returncode == 0
    gw.kill()  # SIGKILL right after the acknowledgements: the catalog may not have them yet
    wait_for(lambda: _refused(gw.port), 15, 0.1, "the killed gateway's receivers to let go of the DICOM port")
    gw.start()
    wait_for(lambda: indexed(gw) == 4, 30, 0.5, "the journaled instances in the catalog after the restart")


def test_a_second_gateway_on_the_same_volume_refuses_to_start(gw, tmp_path):  # type: ignore[no-untyped-def]
    """Two gateways on one D: would send every mail twice and retire each other's keyring: the second stops."""
    assert gw.proc is not None
    keyring = sorted(p.name for p in (gw.d_root / "state" / "gnupg").iterdir())
    assert len(keyring) == 1 and keyring[0].startswith("run-")
    port = free_port()
    other = tmp_path / "second.toml"  # another DICOM port, so that only the shared D: stands in the way
    other.write_text(re.sub(r"(?m)^dicom_port = \d+$", f"dicom_port = {port}", gw.config.read_text()))
    try:
        second = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(other)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a second gateway ran on the same D:")
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"another gateway (pid {gw.proc.pid}) is running on {gw.d_root}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert sorted(p.name for p in (gw.d_root / "state" / "gnupg").iterdir()) == keyring, "keyring left alone"
    make_study(tmp_path / "s", ct=3, mr=0, sc=0)
    assert storescu(gw.port, "TO_B", tmp_path / "s").returncode == 0  # the first one is unharmed
    wait_for(lambda: indexed(gw) == 3, 30, 0.5, "the first gateway to index the study")

    gw.kill()  # a killed gateway leaves no stale lock: the kernel releases it with the process
    again = GatewayProcess("second", other, port, tmp_path / "second.log", gw.d_root)
    try:
        again.start()
        assert indexed(again) == 3
    finally:
        again.stop()
