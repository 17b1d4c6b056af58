"""The kill test's short form: 30 SIGKILLs of sender or receiver while studies stream through the real cluster, with
both gateways reporting to a real audit repository (rsyslog over TLS)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_killtest(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """bench/killtest.py in a process group of its own: however the test ends (its own timeout, pytest-timeout's,
    a failure), the driver and every gateway it started end with it, and none is left to take the next test's
    mail out of the shared mailboxes."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "killtest.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the driver stops its gateways and the audit repository
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left (a hung gateway, rsyslogd)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.timeout(1900)  # the kill test bounds itself well inside this (pyproject's 600 s is for one test)
def test_thirty_kills_lose_and_duplicate_nothing(mail):  # type: ignore[no-untyped-def]
    r = run_killtest("--kills", "30", "--settle", "240", timeout=1800)
    report = r.stdout + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    assert int(fields["kills"]) == 30, report
    assert int(fields["acknowledged"]) > 100, f"too little traffic to mean anything: {report}"
    assert fields["lost"] == "0" and fields["duplicates"] == "0", report
    # the audit trail's form: every record reached the repository, none twice unmarked, every stored instance
    # counted by its events (received, sent, received by mail) and none twice unless marked as replayed
    audit = dict(item.split("=") for item in r.stdout.strip().splitlines()[-2].split())
    assert audit == {"audit_missing": "0", "audit_unmarked_twice": "0", "audit_miscounted": "0"}, report
    orphans = r.stdout.strip().splitlines()[-3].rsplit("orphans=", 1)[1]
    assert orphans == "0", f"processes of killed gateways still running: {report}"


@pytest.mark.timeout(2500)
def test_thirty_kills_of_cluster_nodes_and_galera_members_lose_and_duplicate_nothing(mail, galera):  # type: ignore[no-untyped-def]
    """The cluster form (issue 17): two nodes per gateway on the Galera test cluster, one D: per gateway; the driver
    SIGKILLs gateway nodes and Galera members at random while studies stream to either node of A."""
    r = run_killtest("--cluster", "--kills", "30", "--settle", "300", timeout=2400)
    report = r.stdout + r.stderr[-3000:]
    fields = dict(item.split("=") for item in r.stdout.strip().splitlines()[-1].split())
    assert int(fields["kills"]) == 30, report
    assert int(fields["acknowledged"]) > 100, f"too little traffic to mean anything: {report}"
    assert fields["lost"] == "0" and fields["duplicates"] == "0", report
    orphans = r.stdout.strip().splitlines()[-3].rsplit("orphans=", 1)[1]
    assert orphans == "0", f"processes of killed gateways still running: {report}"
    assert galera.size() == 3, "the Galera test cluster is whole again"
