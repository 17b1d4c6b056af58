"""Mail-node faults against the real cluster: hung nodes, a node with a foreign certificate, 421, nodes down."""

from __future__ import annotations

import ipaddress
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.devtools.pki import CA
from gateway.devtools.studies import make_study
from tests.conftest import storescu, wait_for
from tests.faults import FakeSmtp, silent_listener
from tests.ports import free_port
from tests.test_e2e import assert_delivered_identically, transfers


def test_hung_rogue_and_421_nodes_are_skipped_and_tls_never_falls_back(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    # a node whose certificate comes from another CA (a TLS-intercepting proxy, or a spoofed node)
    rogue_server = CA(pki_dir, "rogue-ca", "Rogue CA").issue(
        "rogue-mail-server",
        "mail.dicommail.test",
        eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.18")), x509.DNSName("mail.dicommail.test")],
    )
    busy_port = (
        free_port()
    )  # a node with a valid certificate (127.0.0.1 is in its SANs) that says 421 mid-session
    b = make_gateway(
        "gateway-b",
        [("gateway-a", "gateway-a", "TO_A")],
        poll_interval=1,
        pop3_nodes=["127.0.0.17:995", "127.0.0.12:995"],  # the first one hangs
    )
    a = make_gateway(
        "gateway-a",
        [("gateway-b", "gateway-b", "TO_B")],
        stability_delay=1,
        smtp_nodes=["127.0.0.17:25", "127.0.0.18:25", f"127.0.0.1:{busy_port}", "127.0.0.11:25"],
    )
    with (
        silent_listener("127.0.0.17", 25),
        silent_listener("127.0.0.17", 995),
        FakeSmtp("127.0.0.18", 25, "rogue-tls", rogue_server.cert, rogue_server.key) as rogue_node,
        FakeSmtp(
            "127.0.0.1", busy_port, "421", pki_dir / "mail-server.pem", pki_dir / "mail-server.key"
        ) as busy_node,
    ):
        b.start()
        a.start()
        sources = make_study(tmp_path / "s", ct=3, mr=2, sc=1, size=32)
        assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0
        wait_for(lambda: transfers(b, "in", "complete"), 120, 1, "delivery past the faulty nodes")
        assert_delivered_identically(a, b, sources)
        assert rogue_node.sessions >= 1 and not rogue_node.plaintext_mail_from, (
            "no plaintext after a TLS failure"
        )
        assert busy_node.sessions >= 1 and not busy_node.plaintext_mail_from
    log_a = a.log.read_text()
    assert (
        "127.0.0.17:25 failed" in log_a
        and "127.0.0.18:25 failed" in log_a
        and f"127.0.0.1:{busy_port} failed: 421" in log_a
    )
    assert "127.0.0.17:995 failed" in b.log.read_text()


def test_all_smtp_nodes_down_then_back(mail, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    """A cluster-wide outage defers mails; the first delivery afterwards makes them due at once (no 60 s wait)."""
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1, retry_base=60)
    mail.set_nodes(list(range(1, 7)), up=False, pop3=False)
    b.start()
    a.start()
    during = make_study(tmp_path / "during", ct=2, mr=1, sc=1, size=32, seed=21)
    assert storescu(a.port, "TO_B", tmp_path / "during").returncode == 0
    wait_for(lambda: "deferred" in a.log.read_text(), 30, 0.5, "the mail to be deferred")
    assert not transfers(a, "out", "sent")
    mail.set_nodes(list(range(1, 7)), up=True, pop3=False)
    back = time.monotonic()
    after = make_study(tmp_path / "after", ct=1, mr=0, sc=0, size=32, seed=22)
    assert storescu(a.port, "TO_B", tmp_path / "after").returncode == 0
    wait_for(
        lambda: len(transfers(b, "in", "complete")) == 2, 45, 1, "both studies, well before the 60 s backoff"
    )
    assert time.monotonic() - back < 45
    assert_delivered_identically(a, b, during + after)


def restart_mariadb() -> None:
    """Shut the machine's MariaDB down and start it again (as the machine kind documents).

    Only the server on 3306 is meant: the Galera test cluster's members are `mariadbd` processes too, so the old
    server is told apart by the pid in its own pid file, and the new one is started against that pid file.
    """
    pid_file = subprocess.run(
        ["mariadb", "-h127.0.0.1", "-uroot", "-N", "-e", "select @@pid_file"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    pid = int(Path(pid_file).read_text().strip())
    subprocess.run(["mariadb-admin", "-h127.0.0.1", "-uroot", "shutdown"], check=True, timeout=60)

    def gone() -> bool:  # shutdown returns before the process has exited
        return not Path(f"/proc/{pid}").exists()

    wait_for(gone, 60, 0.2, "the old MariaDB to exit")
    subprocess.run(
        [
            "start-stop-daemon",
            "--start",
            "--oknodo",
            "--background",
            "--pidfile",
            pid_file,
            "--exec",
            "/usr/sbin/mariadbd",
        ],
        check=True,
        timeout=30,
    )

    def up() -> bool:
        return (
            subprocess.run(
                ["mariadb", "-h127.0.0.1", "-uroot", "-e", "select 1"], capture_output=True
            ).returncode
            == 0
        )

    wait_for(up, 60, 0.5, "MariaDB to come back")


def test_mariadb_restart_while_running_loses_nothing(mail, mariadb_url, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    a = make_gateway(
        "gateway-a", [("gateway-b", "gateway-b", "TO_B")], database_url=mariadb_url, stability_delay=3
    )
    b.start()
    a.start()
    first = make_study(tmp_path / "one", ct=4, mr=2, sc=1, size=32, seed=11)
    assert storescu(a.port, "TO_B", tmp_path / "one").returncode == 0  # acknowledged, catalog rows pending
    restart_mariadb()  # while the study waits for its quiet period
    second = make_study(tmp_path / "two", ct=3, mr=1, sc=1, size=32, seed=12)
    assert storescu(a.port, "TO_B", tmp_path / "two").returncode == 0
    wait_for(lambda: len(transfers(b, "in", "complete")) == 2, 120, 1, "both studies at B")
    assert_delivered_identically(a, b, first + second)
