"""The DICOM receiver processes of stage 1: both cores take C-STOREs, the main process keeps the catalog.

Python runs one thread at a time per process, and receiving DICOM is CPU work (PDUs, hashing, reading the
header); the main process's event loop (mail, catalog, web) would compete for the same interpreter. So the gateway
runs `gateway.dicom_workers` receiver processes (default: one per core):

    main process                                   receiver process k (python -m gateway.stages.receivers)
    ─────────────────────────────────────────      ──────────────────────────────────────────────────────
    listening socket, accept thread ── fd ──────▶  association thread: PDUs → temp file → DurableIntake.store
      (the receiver with the fewest associations)    (fsync, rename, journal-k fdatasync) → C-STORE-RSP
    Intake.reported ◀──────────── event line ───── "stored" / "conflict" / "refused" / "ended"
    index batch committed ─── "indexed n" ──────▶  journal-k emptied once all of it is indexed

The listening socket stays in the main process, so the port is open as long as the gateway runs and a receiver
that dies is replaced without refusing anybody: its journal is indexed and deleted, a new one starts. A receiver
dies with the main process (PR_SET_PDEATHSIG), and it ends when its control socket closes (shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.adapters.dicom import DicomListener, DicomScp, ServesDicomPort
from gateway.adapters.dicom.commitment import ReportBox
from gateway.children import die_with_parent
from gateway.config import Settings
from gateway.stages.receive import DurableIntake, Intake, IntakeJournal
from gateway.storage import Storage

log = logging.getLogger(__name__)

_ASSOCIATION, _ASSOCIATION_TLS, _INDEXED = b"A", b"T", b"I"  # T: from the TLS port, the receiver does the TLS


def report_peers(settings: Settings) -> dict[str, tuple[list[str], str]]:
    """The PACS that may report storage commitment to our DICOM port: their AE title → (their addresses, the AE
    title we call them with, which they call us by)."""
    out: dict[str, tuple[list[str], str]] = {}
    for p in settings.pacs:
        if p.storage_commitment:
            ips = set(out.get(p.ae_title, ([], ""))[0]) | set(addresses(p.host))
            out[p.ae_title] = (sorted(ips), p.calling_ae)
    return out


def addresses(host: str) -> list[str]:
    """Every address a host name stands for (a PACS's reports come from one of them)."""
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
    except OSError:
        log.warning("PACS host %s does not resolve: its storage commitment reports will be refused", host)
        return []


@dataclass
class _Receiver:
    """The main process's handle on one receiver process."""

    slot: int
    key: str  # names its journal and its records in the main process's index queue
    proc: subprocess.Popen[bytes]
    # SOCK_SEQPACKET: connections (with their fd) and "indexed" counts go to the receiver
    control: socket.socket
    events: socket.socket  # SOCK_STREAM: JSON lines come back
    journal: Path
    active: int = 0
    ready: bool = False


class ReceiverPool(ServesDicomPort):
    """The DICOM port of the gateway: accepts connections and hands each to the least busy receiver process."""

    def __init__(self, settings: Settings, storage: Storage, intake: Intake, workers: int) -> None:
        self.settings = settings
        self.storage = storage
        self.intake = intake
        self.workers = max(1, workers)
        self.refused = 0
        self.listener = DicomListener((settings.dicom_bind, settings.dicom_port))
        self.tls_listener = (
            DicomListener((settings.dicom_bind, settings.dicom_tls.port)) if settings.dicom_tls else None
        )
        self._receivers: dict[int, _Receiver] = {}
        self._by_key: dict[str, _Receiver] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self.on_report: Callable[[], None] = lambda: None  # a storage commitment report was saved
        # an association was accepted or refused (calling, called, peer, accepted, why): the audit trail's ear
        self.on_association: Callable[[str, str, str, bool, str], None] = lambda *_: None
        intake.on_indexed = self._tell_indexed

    # ---------------------------------------------------------------- the listening socket (main process)
    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every receiver process has started (they are started by `run_forever`), so that the first
        associations are spread over all of them; after `timeout` the port opens with those that are ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                ready = sum(1 for r in self._receivers.values() if r.ready)
            if ready >= self.workers:
                return
            await asyncio.sleep(0.05)
        log.error("only %d of %d DICOM receivers started within %.0f s", ready, self.workers, timeout)

    def start(self) -> None:
        """Open the DICOM port (the receivers are started by `run_forever`)."""
        self.listener.open(self._hand_over)
        if self.tls_listener is not None:
            self.tls_listener.open(lambda conn, peer: self._hand_over(conn, peer, _ASSOCIATION_TLS))

    def _hand_over(self, conn: socket.socket, peer: str, kind: bytes = _ASSOCIATION) -> None:
        try:
            self._dispatch(conn, peer, kind)
        finally:
            conn.close()  # the receiver holds its own copy of the descriptor now

    def _dispatch(self, conn: socket.socket, peer: str, kind: bytes = _ASSOCIATION) -> None:
        """Hand a connection to the ready receiver with the fewest associations (waits while none is ready)."""
        deadline = time.monotonic() + 30
        with self._cond:
            while True:
                ready = [r for r in self._receivers.values() if r.ready]
                if ready or self._stopping or time.monotonic() > deadline:
                    break
                self._cond.wait(0.5)
            if not ready:
                log.error("no DICOM receiver process is running: connection from %s closed", peer)
                return
            target = min(ready, key=lambda r: r.active)
            target.active += 1
        try:
            socket.send_fds(target.control, [kind + peer.encode()], [conn.fileno()])
        except OSError as exc:
            with self._cond:
                target.active -= 1
            log.error("receiver %d did not take a connection from %s: %s", target.slot, peer, exc)

    def _tell_indexed(self, counts: dict[str, int]) -> None:
        for key, n in counts.items():
            receiver = self._by_key.get(key)
            if receiver is not None:
                with contextlib.suppress(OSError):
                    receiver.control.send(_INDEXED + str(n).encode())

    # ---------------------------------------------------------------- the receiver processes
    def _spawn(self, slot: int) -> _Receiver:
        control_main, control_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        events_main, events_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        key = f"{slot}-{time.time_ns()}"
        journal = self.storage.intake / f"journal-{key}.jsonl"
        s = self.settings
        spec = {
            "d_root": str(s.d_root),
            "min_free": s.min_free,
            "min_free_inodes": s.min_free_inodes,
            "node": s.node,
            "ae_title": s.ae_title,
            "routes": {p.ae_title: p.name for p in s.partners},
            "rule_aes": sorted(s.routing.called_aes()),  # called AE titles routing rules name: accepted too
            "allowed_calling_ae": list(s.allowed_calling_ae),
            "allowed_networks": [str(n) for n in s.allowed_networks],
            "timeout": s.dicom_timeout,
            "journal": str(journal),
            "report_peers": report_peers(s),
            "control_fd": control_child.fileno(),
            "events_fd": events_child.fileno(),
            "log_level": s.log_level,
            "parent": os.getpid(),
            "tls": None
            if s.dicom_tls is None
            else {
                "port": s.dicom_tls.port,
                "cert": str(s.dicom_tls.cert),
                "key": str(s.dicom_tls.key),
                "client_ca": str(s.dicom_tls.client_ca) if s.dicom_tls.client_ca else None,
            },
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.stages.receivers", json.dumps(spec)],
            pass_fds=(control_child.fileno(), events_child.fileno()),
            stdin=subprocess.DEVNULL,
        )
        control_child.close()
        events_child.close()
        receiver = _Receiver(slot, key, proc, control_main, events_main, journal)
        with self._cond:
            self._receivers[slot] = receiver
            self._by_key[key] = receiver
        return receiver

    async def _run_slot(self, slot: int) -> None:
        """Keep one receiver process running; index the journal of one that died, start another."""
        while not self._stopping:
            receiver = self._spawn(slot)
            reader, writer = await asyncio.open_unix_connection(sock=receiver.events)
            try:
                while line := await reader.readline():
                    self._event(receiver, json.loads(line))
            finally:
                writer.close()
            code = await asyncio.to_thread(receiver.proc.wait)
            with self._cond:
                self._receivers.pop(slot, None)
                self._cond.notify_all()
            receiver.control.close()
            # everything it journaled is durable and was acknowledged: index it before its key is forgotten
            await self.intake.replay(receiver.journal)
            self._by_key.pop(receiver.key, None)
            if self._stopping:
                return
            log.error("DICOM receiver %d ended (exit %s); starting another", slot, code)
            await asyncio.sleep(1)

    def _event(self, receiver: _Receiver, event: dict[str, Any]) -> None:
        kind = event.get("t")
        if kind == "ready":
            with self._cond:
                receiver.ready = True
                self._cond.notify_all()
        elif kind == "ended":
            with self._cond:
                receiver.active = max(0, receiver.active - 1)
        elif kind == "refused":
            self.refused += 1
        elif kind == "commitment":
            self.on_report()
        elif kind == "association":
            self.on_association(
                str(event.get("calling", "")),
                str(event.get("called", "")),
                str(event.get("peer", "")),
                bool(event.get("ok")),
                str(event.get("why", "")),
            )
        else:
            self.intake.reported(receiver.key, event)

    async def run_forever(self) -> None:
        """Run the receiver processes until cancelled; on the way out they are stopped."""
        try:
            async with asyncio.TaskGroup() as tg:
                for slot in range(self.workers):
                    tg.create_task(self._run_slot(slot), name=f"dicom-receiver-{slot}")
        finally:
            self._stop_receivers()

    def _stop_receivers(self) -> None:
        self._stopping = True
        receivers = list(self._receivers.values())
        for r in receivers:
            with contextlib.suppress(OSError):
                r.control.shutdown(socket.SHUT_WR)  # the receiver finishes its associations and exits
        deadline = time.monotonic() + 10
        for r in receivers:
            try:
                r.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait(5)

    def pause(self, closed: bool) -> None:
        """Close the DICOM port for a while (a cluster node that lost its catalog), or open it again."""
        if closed:
            self.listener.close()
            if self.tls_listener is not None:
                self.tls_listener.close()
        elif not self._stopping and not self.listener.listening:
            self.start()

    def stop(self) -> None:
        """Close the DICOM port: no new associations (running ones finish in their receivers)."""
        self._stopping = True
        self.listener.close()
        if self.tls_listener is not None:
            self.tls_listener.close()
        with self._cond:
            self._cond.notify_all()


# -------------------------------------------------------------------- inside a receiver process
def receiver_main(spec: dict[str, Any]) -> int:
    """A receiver process: associations arrive as descriptors on the control socket until it closes.

    Size: a receiver process's main: set-up, serving and shutdown in the order they happen.
    """
    import ipaddress

    from gateway.logsetup import setup_logging

    die_with_parent(int(spec["parent"]))
    setup_logging(str(spec["log_level"]))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the main process decides when a receiver ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=int(spec["control_fd"]))
    events = socket.socket(fileno=int(spec["events_fd"]))
    send_lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        with send_lock:
            events.sendall(line)

    storage = Storage(
        Path(spec["d_root"]), int(spec["min_free"]), int(spec["min_free_inodes"]), str(spec["node"])
    )
    journal = IntakeJournal(Path(spec["journal"]))
    durable = DurableIntake(storage, dict(spec["routes"]), journal, emit)
    peers = {ae: (frozenset(ips), str(called)) for ae, (ips, called) in dict(spec["report_peers"]).items()}
    scp = DicomScp(
        str(spec["ae_title"]),
        set(spec["routes"]) | set(spec["rule_aes"]),
        ("127.0.0.1", 0),
        storage.tmp,
        durable.store,
        tuple(spec["allowed_calling_ae"]),
        tuple(ipaddress.ip_network(n) for n in spec["allowed_networks"]),
        float(spec["timeout"]),
        on_refused=lambda: emit({"t": "refused"}),
        on_ended=lambda: emit({"t": "ended"}),
        on_association=lambda calling, called, peer, ok, why: emit(
            {"t": "association", "calling": calling, "called": called, "peer": peer, "ok": ok, "why": why}
        ),
        report_peers=peers,
        report_box=ReportBox(storage.commitments),
        on_report=lambda: emit({"t": "commitment"}),
    )
    tls = None
    if spec.get("tls"):
        from gateway.config import DicomTls
        from gateway.tls import dicom_server_context

        t = spec["tls"]
        tls = dicom_server_context(
            DicomTls(
                int(t["port"]),
                Path(t["cert"]),
                Path(t["key"]),
                Path(t["client_ca"]) if t["client_ca"] else None,
            )
        )
    emit({"t": "ready"})
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(control, 4096, 4)
        except OSError:
            break
        if not msg:
            for fd in fds:
                os.close(fd)
            break  # the main process closed the control socket: shut down
        if msg[:1] in (_ASSOCIATION, _ASSOCIATION_TLS) and fds:
            scp.serve(
                socket.socket(fileno=fds[0]),
                msg[1:].decode("ascii", "replace"),
                tls if msg[:1] == _ASSOCIATION_TLS else None,
            )
            for extra in fds[1:]:
                os.close(extra)
        elif msg[:1] == _INDEXED:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(ValueError):
                journal.mark_indexed(int(msg[1:]))
    scp.wait_idle()  # the associations still running finish first
    journal.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(receiver_main(json.loads(sys.argv[1])))
