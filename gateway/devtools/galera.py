"""A MariaDB Galera cluster for the tests (issue 17, see docs/cluster.md): three `mariadbd` members with wsrep on
loopback, beside the machine's own MariaDB on 3306.

    member n (1..3): SQL 127.0.0.1:(3306+n), group communication 4557+10n, IST 4558+10n, SST (rsync) 4559+10n

Each member has its own data directory under the cluster's folder; the first is started with
`--wsrep-new-cluster`, the others join it (a full state transfer by rsync on their first start). What bites (found
by hand, see docs/cluster.md): `mariadb-install-db` needs `--no-defaults` (Debian's /etc/mysql settings get in the
way), and the members run as `mysql` with data directories owned by it (as root, the joiner's rsync daemon drops
to `nobody` and cannot write). Reads wait for the writes the cluster has committed (`wsrep_sync_wait=1`): without
it, a row committed on one member may not be visible on another yet (apply is asynchronous; only certification is
synchronous). A test cluster another checkout left on these ports is stopped first, as the mail cluster does;
anything else on them is an error. Needs root, `mariadb-server` and `galera-4`.

    python -m gateway.devtools.galera up   --dir DIR
    python -m gateway.devtools.galera down --dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pymysql

PROVIDER = "/usr/lib/galera/libgalera_smm.so"
MEMBERS = 3


def sql_port(n: int) -> int:
    return 3306 + n


def _gcomm_port(n: int) -> int:
    return 4557 + 10 * n


class GaleraCluster:
    """Three members in `folder/n1..n3`; `up` starts them (bounded waits), `down` stops them."""

    def __init__(self, folder: Path, name: str = "dmgtest") -> None:
        self.folder = folder.resolve()  # my.cnf wants absolute paths
        self.name = name
        self._procs: dict[int, subprocess.Popen[bytes]] = {}  # members this object started (reaped on stop)

    def url(self, n: int, database: str = "", *more: int) -> str:
        """A catalog URL for member n (and members `more`, to move to in that order when n is gone)."""
        return f"mysql://root@{','.join(f'127.0.0.1:{sql_port(m)}' for m in (n, *more))}/{database}"

    def create_database(self, prefix: str) -> str:
        """A new empty database (on member 1, replicated to all) named `prefix` and a random tail."""
        import uuid

        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        conn = self.connect(1)
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}`")
        finally:
            conn.close()
        return name

    def connect(self, n: int) -> pymysql.connections.Connection:
        return pymysql.connect(
            host="127.0.0.1", port=sql_port(n), user="root", password="", connect_timeout=5
        )

    def _config(self, n: int) -> Path:
        d = self.folder / f"n{n}"
        g = _gcomm_port(n)
        members = ",".join(f"127.0.0.1:{_gcomm_port(k)}" for k in range(1, MEMBERS + 1))
        cnf = d / "my.cnf"
        cnf.write_text(
            f"""[mysqld]
datadir={d / "data"}
socket={d / "mysqld.sock"}
pid-file={d / "mysqld.pid"}
port={sql_port(n)}
bind-address=127.0.0.1
user=mysql
log-error={d / "error.log"}
binlog_format=ROW
default_storage_engine=InnoDB
innodb_autoinc_lock_mode=2
innodb_buffer_pool_size=64M
wsrep_on=ON
wsrep_provider={PROVIDER}
wsrep_cluster_name={self.name}
wsrep_cluster_address=gcomm://{members}
wsrep_node_address=127.0.0.1:{g}
wsrep_node_name=n{n}
wsrep_sst_method=rsync
wsrep_sync_wait=1
wsrep_sst_receive_address=127.0.0.1:{g + 2}
wsrep_provider_options="gmcast.listen_addr=tcp://127.0.0.1:{g};ist.recv_addr=127.0.0.1:{g + 1}"
"""
        )
        return cnf

    def _prepare(self, n: int) -> None:
        d = self.folder / f"n{n}"
        if (d / "data" / "mysql").exists():
            return
        shutil.rmtree(d, ignore_errors=True)
        (d / "data").mkdir(parents=True)
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={d / 'data'}",
             "--auth-root-authentication-method=normal"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def _chown(self) -> None:
        mysql = pwd.getpwnam("mysql")
        for root, dirs, files in os.walk(self.folder):
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), mysql.pw_uid, mysql.pw_gid)
        os.chown(self.folder, mysql.pw_uid, mysql.pw_gid)

    def start_member(self, n: int, new_cluster: bool = False, timeout: float = 120) -> None:
        """Start member n and wait (bounded) until it answers SQL and is Synced."""
        cnf = self._config(n)
        self._chown()
        args = ["mariadbd", f"--defaults-file={cnf}", *(["--wsrep-new-cluster"] if new_cluster else [])]
        self._procs[n] = subprocess.Popen(
            args,
            stdout=(self.folder / f"n{n}" / "stdout.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(n) == "Synced":
                return
            if self._procs[n].poll() is not None:  # gave up (a port taken, a bad state file): say so at once
                raise RuntimeError(
                    f"Galera member n{n} exited ({self._procs[n].returncode}); see {self.folder / f'n{n}'}"
                )
            time.sleep(0.5)
        raise RuntimeError(
            f"Galera member n{n} not Synced within {timeout:.0f} s; see {self.folder / f'n{n}'}"
        )

    def state(self, n: int) -> str | None:
        """The member's `wsrep_local_state_comment` (Synced, Joining, …), None if it does not answer."""
        try:
            conn = self.connect(n)
        except pymysql.err.OperationalError:
            return None
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT @@datadir")
                datadir = Path(str(cur.fetchone()[0]))
                if datadir.resolve() != (self.folder / f"n{n}" / "data").resolve():
                    # another checkout's test cluster (or anything else) on our ports: never test against it
                    # (`up` stops another checkout's)
                    raise RuntimeError(
                        f"port {sql_port(n)} is held by another MariaDB (datadir {datadir}): stop it first"
                    )
                cur.execute("SHOW STATUS LIKE 'wsrep_local_state_comment'")
                row = cur.fetchone()
            return str(row[1]) if row else None
        finally:
            conn.close()

    def size(self, n: int = 1) -> int:
        conn = self.connect(n)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW STATUS LIKE 'wsrep_cluster_size'")
                row = cur.fetchone()
            return int(row[1]) if row else 0
        finally:
            conn.close()

    def up(self) -> None:
        """Start every member (the first bootstraps the cluster); a running cluster is stopped first."""
        self.down()
        self._take_over_other_cluster()
        self.folder.mkdir(parents=True, exist_ok=True)
        for n in range(1, MEMBERS + 1):
            self._prepare(n)
        grastate = self.folder / "n1" / "data" / "grastate.dat"
        if grastate.exists():  # a member stopped by a kill may not bootstrap until told it is safe
            grastate.write_text(grastate.read_text().replace("safe_to_bootstrap: 0", "safe_to_bootstrap: 1"))
        self.start_member(1, new_cluster=True)
        for n in range(2, MEMBERS + 1):
            self.start_member(n)

    def _take_over_other_cluster(self) -> None:
        """Stop a test cluster another checkout left on our ports (as the mail cluster does); anything else on
        them is an error."""
        for n in range(MEMBERS, 0, -1):
            try:
                conn = self.connect(n)
            except pymysql.err.OperationalError:
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT @@datadir")
                    member = Path(str(cur.fetchone()[0])).parent
            finally:
                conn.close()
            pid_file = member / "mysqld.pid"
            if not (member / "my.cnf").exists() or not pid_file.exists():
                raise RuntimeError(f"port {sql_port(n)} is held by a MariaDB that is no test cluster member")
            pid = int(pid_file.read_text().strip())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)

    def ensure_up(self) -> bool:
        """Use the cluster if every member is Synced already (the test session's), else start it; True when this
        call started it (and its caller should stop it)."""
        try:
            if all(self.state(n) == "Synced" for n in range(1, MEMBERS + 1)):
                return False
        except RuntimeError:  # another checkout's cluster on our ports: `up` stops it
            pass
        self.up()
        return True

    def pid(self, n: int) -> int | None:
        try:
            return int((self.folder / f"n{n}" / "mysqld.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop_member(self, n: int, kill: bool = False, timeout: float = 60) -> None:
        """SIGTERM (or SIGKILL) member n and wait until it is gone."""
        pid = self.pid(n)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            return
        proc = self._procs.pop(n, None)
        if proc is not None and proc.pid == pid:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        else:  # started by another process: wait until it is gone (or a zombie of its parent)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
        (self.folder / f"n{n}" / "mysqld.pid").unlink(missing_ok=True)

    def down(self) -> None:
        """Stop every member, the last started first (the first one then holds the newest state)."""
        for n in range(MEMBERS, 0, -1):
            self.stop_member(n)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def main() -> int:
    ap = argparse.ArgumentParser(description="the Galera test cluster")
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--dir", required=True)
    a = ap.parse_args()
    cluster = GaleraCluster(Path(a.dir))
    if a.action == "up":
        cluster.up()
        print(f"Galera cluster of {cluster.size()} members: " + ", ".join(cluster.url(n) for n in (1, 2, 3)))
    else:
        cluster.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
