"""The local test mail cluster: one Postfix and one Dovecot master standing in for six nodes mail1..mail6 on
127.0.0.11..16, SMTP 25 with required client certificates, POP3S 995 and IMAPS 993 with certificate login, one shared set of
mailboxes. Single nodes can be taken down and brought back.

    python -m gateway.devtools.mailcluster up   --dir DIR --pki DIR --mailbox gateway-a --mailbox gateway-b
    python -m gateway.devtools.mailcluster node-down 3 --dir DIR
    python -m gateway.devtools.mailcluster down --dir DIR

It needs root (ports 25/995, the mail user) and installs Postfix and Dovecot with apt if they are missing.


Size: a development tool: the cluster's configuration files are written here in full.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.devtools import pki

NODE_COUNT = 6
# The node addresses are machine-wide, so only one cluster can run per machine. The running one is recorded here
# so that a new `up` from another checkout (a CI clone, say) can stop it and take over instead of failing.
RUNNING_POINTER = Path("/tmp/dicom-mail-gateway-mailcluster.path")
MAIL_UID = 8  # Debian's `mail` user owns the maildirs


def node_ip(n: int) -> str:
    """IP of node n (1-based)."""
    return f"127.0.0.{10 + n}"


def ensure_installed() -> None:
    """Install Postfix and Dovecot from Debian if missing, without letting Debian start system daemons."""
    if (
        shutil.which("postfix")
        and shutil.which("dovecot")
        and Path("/usr/lib/dovecot/pop3").exists()
        and Path("/usr/lib/dovecot/imap").exists()
    ):
        return
    policy = Path("/usr/sbin/policy-rc.d")
    had_policy = policy.exists()
    if not had_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["debconf-set-selections"],
            input=b"postfix postfix/main_mailer_type select No configuration\n",
            check=False,
        )
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            [
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "postfix",
                "dovecot-core",
                "dovecot-pop3d",
                "dovecot-imapd",
            ],
            check=True,
            env=env,
        )
    finally:
        if not had_policy:
            policy.unlink(missing_ok=True)


def _accepts(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=1):
            return True
    except OSError:
        return False


def _stop_orphaned_daemons() -> int:
    """Kill Postfix masters and Dovecots of a mail cluster of this tool (by their paths), and their children.

    Orphans: their folders are gone, so they cannot be stopped cleanly (Dovecot ignores SIGTERM without its
    base_dir); SIGKILL, then every process they started."""
    stopped = 0
    killed: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ours = False
            if "postfix/sbin/master" in cmdline:
                ours = "/mailcluster/postfix" in os.readlink(proc / "cwd")
            elif cmdline.startswith("/usr/sbin/dovecot") or cmdline.startswith("dovecot"):
                ours = "/mailcluster/dovecot/" in cmdline
            if ours:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.add(int(proc.name))
                stopped += 1
        except (OSError, ValueError):
            continue
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid in killed:
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                continue
    return stopped


@dataclass
class MailCluster:
    """A running (or stoppable) cluster whose state lives in `root`."""

    root: Path

    @property
    def pf(self) -> Path:
        return self.root / "postfix"

    @property
    def dv(self) -> Path:
        return self.root / "dovecot"

    @property
    def maildirs(self) -> Path:
        return self.root / "maildirs"

    @property
    def state_file(self) -> Path:
        return self.root / "cluster.json"

    def _state(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {"down_smtp": [], "down_pop3": [], "mailboxes": []}

    def _save_state(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state))

    # ---------------------------------------------------------------- configuration
    def _write_postfix(self, ca: Path, cert: pki.Issued, state: dict) -> None:
        """Size: Postfix's configuration, written as the files read."""
        pf = self.pf
        for d in ("conf", "queue", "data", "log"):
            (pf / d).mkdir(parents=True, exist_ok=True)
        shutil.chown(pf / "data", "postfix", "postfix")
        mailboxes = state["mailboxes"]
        (pf / "conf" / "vmailbox").write_text(
            "".join(f"{a} {a.split('@')[1]}/{a.split('@')[0]}/\n" for a in mailboxes)
        )
        main = f"""
compatibility_level = 3.6
queue_directory = {pf / "queue"}
data_directory = {pf / "data"}
mail_owner = postfix
setgid_group = postdrop
myhostname = mail.{pki.DOMAIN}
mydomain = {pki.DOMAIN}
myorigin = $mydomain
mydestination =
inet_interfaces = all
inet_protocols = ipv4
maillog_file = {pf / "log" / "postfix.log"}
maillog_file_prefixes = {pf / "log"}
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtputf8_enable = no
smtpd_banner = $myhostname ESMTP
smtpd_tls_cert_file = {cert.cert}
smtpd_tls_key_file = {cert.key}
smtpd_tls_CAfile = {ca}
tls_append_default_CA = no
smtpd_tls_security_level = encrypt
smtpd_tls_ask_ccert = yes
smtpd_tls_req_ccert = yes
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtpd_relay_restrictions = permit_tls_all_clientcerts, reject
smtpd_recipient_restrictions = permit_tls_all_clientcerts, reject
virtual_mailbox_domains = static:all
virtual_mailbox_maps = texthash:{pf / "conf" / "vmailbox"}
virtual_mailbox_base = {self.maildirs}
virtual_uid_maps = static:{MAIL_UID}
virtual_gid_maps = static:{MAIL_UID}
virtual_minimum_uid = {MAIL_UID}
message_size_limit = 209715200
virtual_mailbox_limit = 0
mailbox_size_limit = 0
smtpd_timeout = 60s
recipient_delimiter = +
"""
        (pf / "conf" / "main.cf").write_text(main)
        nodes = "".join(
            f"{node_ip(n)}:25 inet n - n - - smtpd -o myhostname=mail{n}.{pki.DOMAIN}\n"
            for n in range(1, NODE_COUNT + 1)
            if n not in state["down_smtp"]
        )
        # qmgr wakes every second: a node going down is a `postfix reload`, which restarts qmgr, and a mail that
        # cleanup hands over in that moment loses its wake-up call; with Debian's 300 s timer it then waited up to
        # five minutes in the incoming queue (seen as a flaky failover test).
        master = (
            nodes
            + """pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       1       1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
        )
        (pf / "conf" / "master.cf").write_text(master)

    def _write_dovecot(self, ca: Path, cert: pki.Issued, state: dict) -> None:
        """Size: Dovecot's configuration, written as the file reads."""
        dv = self.dv
        for d in ("run", "state", "log"):
            (dv / d).mkdir(parents=True, exist_ok=True)
        up = [n for n in range(1, NODE_COUNT + 1) if n not in state["down_pop3"]]
        listen = ", ".join(node_ip(n) for n in up) if up else "127.0.0.254"
        locals_ = "".join(
            f"local {node_ip(n)} {{\n  login_greeting = mail{n}.{pki.DOMAIN} POP3 ready\n}}\n" for n in up
        )
        conf = f"""
base_dir = {dv / "run"}
state_dir = {dv / "state"}
log_path = {dv / "log" / "dovecot.log"}
info_log_path = {dv / "log" / "dovecot.log"}
protocols = pop3 imap
listen = {listen}
ssl = required
ssl_cert = <{cert.cert}
ssl_key = <{cert.key}
ssl_ca = <{ca}
ssl_verify_client_cert = yes
ssl_require_crl = no
auth_ssl_require_client_cert = yes
auth_ssl_username_from_cert = yes
ssl_cert_username_field = commonName
auth_mechanisms = external plain
disable_plaintext_auth = yes
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_UID} home={self.maildirs}/%d/%n
}}
mail_location = maildir:~
first_valid_uid = {MAIL_UID}
default_internal_user = dovecot
default_login_user = dovenull
pop3_uidl_format = %08Xu%08Xv
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 995
    ssl = yes
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 993
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{locals_}"""
        (dv / "dovecot.conf").write_text(conf)

    def _configure(self, state: dict) -> None:
        pki_dir = Path(state["pki"])
        ca = pki.CA(pki_dir, "ca", "DICOM Mail dev CA")
        cert = pki.mail_server_cert(ca)
        self._write_postfix(ca.cert_path, cert, state)
        self._write_dovecot(ca.cert_path, cert, state)

    # ---------------------------------------------------------------- life cycle
    def up(self, pki_dir: Path, mailboxes: list[str]) -> None:
        """Start the cluster (idempotent: a running cluster is reconfigured and reloaded)."""
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        pki.make_dev_pki(pki_dir, [])
        state = self._state()
        state["pki"] = str(pki_dir.resolve())
        addrs = [m if "@" in m else pki.address_of(m) for m in mailboxes]
        state["mailboxes"] = sorted(set(state.get("mailboxes", [])) | set(addrs))
        self._save_state(state)
        for addr in state["mailboxes"]:
            local, domain = addr.split("@")
            for sub in ("cur", "new", "tmp"):
                (self.maildirs / domain / local / sub).mkdir(parents=True, exist_ok=True)
        for dirpath, _dirs, _files in os.walk(self.maildirs):
            os.chown(dirpath, MAIL_UID, MAIL_UID)
        self._configure(state)
        self._take_over_other_cluster()
        self._check_ports_free(state)
        conf = str(self.pf / "conf")
        if self._postfix_running():
            subprocess.run(["postfix", "-c", conf, "reload"], check=True, capture_output=True)
        else:
            subprocess.run(["postfix", "-c", conf, "set-permissions"], check=False, capture_output=True)
            self._start_daemon(["postfix", "-c", conf, "start"], self.pf / "log" / "start.log")
        self._restart_dovecot()  # starts it when it is not running, and checks it serves TLS
        self.wait_ready(state)
        RUNNING_POINTER.write_text(str(self.root))

    @staticmethod
    def _start_daemon(cmd: list[str], log: Path) -> None:
        # A daemon inherits its parent's stdout/stderr; pipes would keep subprocess.run waiting forever.
        with log.open("ab") as out:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} start failed (exit {r.returncode}); see {log} and {log.parent}")

    def _take_over_other_cluster(self) -> None:
        """Stop a cluster another checkout left on the machine-wide node addresses (ours is reloaded instead)."""
        if self._postfix_running():
            return
        stopped = False
        try:
            other = Path(RUNNING_POINTER.read_text().strip())
        except OSError:
            other = None
        if other is not None and other != self.root and (other / "cluster.json").exists():
            MailCluster(other).down()
            stopped = True
        if any(_accepts((node_ip(n), port)) for n in range(1, NODE_COUNT + 1) for port in (25, 995)):
            # a cluster whose folder was deleted (a removed clone) cannot be stopped through its configuration
            _stop_orphaned_daemons()
            stopped = True
        if stopped:
            for n in range(1, NODE_COUNT + 1):
                self._wait_closed((node_ip(n), 25))
                self._wait_closed((node_ip(n), 995))

    def _check_ports_free(self, state: dict) -> None:
        if self._postfix_running():
            return
        for n in range(1, NODE_COUNT + 1):
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((node_ip(n), 25)) == 0:
                    raise RuntimeError(
                        f"something else already listens on {node_ip(n)}:25 (a system Postfix on 0.0.0.0:25?); stop it first"
                    )

    def wait_ready(self, state: dict | None = None, timeout: float = 20.0) -> None:
        """Block until every node that should be up accepts connections on 25 and 995."""
        state = state or self._state()
        deadline = time.monotonic() + timeout
        want = [(node_ip(n), 25) for n in range(1, NODE_COUNT + 1) if n not in state["down_smtp"]]
        want += [
            (node_ip(n), port)
            for n in range(1, NODE_COUNT + 1)
            if n not in state["down_pop3"]
            for port in (995, 993)
        ]
        for addr in want:
            while True:
                try:
                    with socket.create_connection(addr, timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mail cluster node {addr[0]}:{addr[1]} did not come up") from None
                    time.sleep(0.1)

    def _wait_closed(self, addr: tuple[str, int], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(addr, timeout=1):
                    pass
            except OSError:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{addr[0]}:{addr[1]} still accepts connections")

    def _postfix_running(self) -> bool:
        r = subprocess.run(["postfix", "-c", str(self.pf / "conf"), "status"], capture_output=True)
        return r.returncode == 0

    def _dovecot_pid(self) -> int | None:
        pidfile = self.dv / "run" / "master.pid"
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def down(self) -> None:
        """Stop both daemons; mailboxes stay on disk."""
        if (self.pf / "conf" / "main.cf").exists() and self._postfix_running():
            subprocess.run(["postfix", "-c", str(self.pf / "conf"), "stop"], capture_output=True)
        self._stop_dovecot()

    def _stop_dovecot(self, timeout: float = 10.0) -> None:
        """SIGTERM to Dovecot's master and wait (bounded) until it is gone."""
        pid = self._dovecot_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._dovecot_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def set_node(self, n: int, up: bool, smtp: bool = True, pop3: bool = True) -> None:
        """Take node n's SMTP and/or POP3S listener down (connection refused) or bring it back."""
        self.set_nodes([n], up, smtp, pop3)

    def set_nodes(self, nodes: list[int], up: bool, smtp: bool = True, pop3: bool = True) -> None:
        """Take several nodes down or up at once; only a daemon whose configuration changed is touched."""
        state = self._state()
        for proto, enabled in (("down_smtp", smtp), ("down_pop3", pop3)):
            if not enabled:
                continue
            down = set(state[proto])
            down = down - set(nodes) if up else down | set(nodes)
            state[proto] = sorted(down)
        self._save_state(state)
        master_cf, dovecot_conf = self.pf / "conf" / "master.cf", self.dv / "dovecot.conf"
        before = (master_cf.read_text(), dovecot_conf.read_text())
        self._configure(state)
        if master_cf.read_text() != before[0]:
            subprocess.run(
                ["postfix", "-c", str(self.pf / "conf"), "reload"], check=True, capture_output=True
            )
        if dovecot_conf.read_text() != before[1] or self._dovecot_pid() is None:
            # A full restart: Dovecot 2.3's master has been seen to panic on reloads in quick succession.
            self._restart_dovecot()
        # Every node that should be up must answer before the caller goes on, also after taking others down:
        # a reload or restart must not leave the test's first connections to meet a cluster still restarting.
        self.wait_ready(state)
        if not up:
            for n in nodes:
                if smtp:
                    self._wait_closed((node_ip(n), 25))
                if pop3:
                    self._wait_closed((node_ip(n), 995))

    def _restart_dovecot(self) -> None:
        """Stop Dovecot and start it again, until it really serves TLS (bounded): a Dovecot that read its
        configuration while it was being rewritten keeps running with an empty certificate and no passdb, and
        only a handshake shows it (seen once under load: every POP3 login reset for the rest of the run)."""
        for _ in range(3):
            self._stop_dovecot()
            self._start_daemon(
                ["dovecot", "-c", str(self.dv / "dovecot.conf")], self.dv / "log" / "start.log"
            )
            if self._dovecot_serves_tls():
                return
        raise RuntimeError(f"Dovecot does not complete a TLS handshake; see {self.dv / 'log'}")

    def _dovecot_serves_tls(self, timeout: float = 10.0) -> bool:
        """True once a POP3S node of the cluster completes a TLS handshake with the cluster's CA."""
        state = self._state()
        up = [n for n in range(1, NODE_COUNT + 1) if n not in state.get("down_pop3", [])]
        if not up or "pki" not in state:
            return True
        ctx = ssl.create_default_context(cafile=str(Path(state["pki"]) / "ca.pem"))
        ctx.check_hostname = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with (
                    socket.create_connection((node_ip(up[0]), 995), timeout=2) as raw,
                    ctx.wrap_socket(raw) as tls,
                ):
                    tls.do_handshake()
                    return True
            except (OSError, ssl.SSLError):
                time.sleep(0.2)
        return False

    def drain(self) -> None:
        """Delete every mail in every mailbox (between tests)."""
        for box in self.maildirs.glob("*/*"):
            for sub in ("new", "cur", "tmp"):
                for f in (box / sub).glob("*"):
                    f.unlink(missing_ok=True)

    def mailbox_count(self, address: str) -> int:
        """How many mails wait in a mailbox (read from the maildir)."""
        local, domain = address.split("@")
        box = self.maildirs / domain / local
        return sum(1 for sub in ("new", "cur") for _ in (box / sub).glob("*"))

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of both logs, for test failure messages."""
        out = []
        for log in (self.pf / "log" / "postfix.log", self.dv / "log" / "dovecot.log"):
            if log.exists():
                out.append(f"== {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(
        prog="mailcluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", choices=["up", "down", "node-down", "node-up", "drain"])
    ap.add_argument("node", nargs="?", type=int)
    ap.add_argument("--dir", default=".dev/mailcluster")
    ap.add_argument("--pki", default="certs/dev")
    ap.add_argument("--mailbox", action="append", default=[])
    ap.add_argument("--only", choices=["smtp", "pop3"])
    a = ap.parse_args(argv)
    cluster = MailCluster(Path(a.dir).resolve())
    if a.command == "up":
        cluster.up(Path(a.pki), a.mailbox or ["gateway-a", "gateway-b"])
        print(
            f"mail cluster up: SMTP {node_ip(1)}..{node_ip(NODE_COUNT)}:25, POP3S :995, state in {cluster.root}"
        )
    elif a.command == "down":
        cluster.down()
    elif a.command == "drain":
        cluster.drain()
    else:
        if a.node is None or not 1 <= a.node <= NODE_COUNT:
            ap.error("node number 1..6 required")
        cluster.set_node(a.node, a.command == "node-up", smtp=a.only != "pop3", pop3=a.only != "smtp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
