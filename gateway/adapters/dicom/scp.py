"""The listening side: the TCP listener, the access policy (calling AE titles, networks, called AE titles), the
limit of associations at once, and handing each received file to the `store` callback (its failure becomes a
DIMSE status through `association.status_for`)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from pynetdicom import _config
from pynetdicom._globals import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
)

from gateway.adapters.dicom.association import ARTIM, Association, Received, status_for
from gateway.adapters.dicom.codec import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STATUS_SUCCESS,
    VERIFICATION,
)
from gateway.adapters.dicom.commitment import (
    STORAGE_COMMITMENT,
    ReportBox,
    parse_report,
    read_report_dataset,
)
from gateway.core.dicominfo import NotDicomError

log = logging.getLogger(__name__)


def quiet_pynetdicom() -> None:
    """pynetdicom logs identifiers (patient name/ID) by default: switch that off for good (the SCU uses it)."""
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").propagate = True


class DicomListener:
    """The DICOM port: a listening socket and the thread that accepts on it, handing each connection on."""

    def __init__(self, bind: tuple[str, int]) -> None:
        self.bind = bind
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def open(self, on_connection: Callable[[socket.socket, str], None]) -> None:
        """Bind and start accepting; `on_connection(conn, peer address)` runs in the accept thread."""
        family = socket.AF_INET6 if ":" in self.bind[0] else socket.AF_INET
        sock = socket.create_server(self.bind, family=family, backlog=128)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock

        def accept_loop() -> None:
            while True:
                try:
                    conn, addr = sock.accept()
                except OSError:
                    return  # the socket was closed: close()
                on_connection(conn, str(addr[0]))

        self._thread = threading.Thread(target=accept_loop, name="dicom-accept", daemon=True)
        self._thread.start()

    @property
    def listening(self) -> bool:
        """True while the DICOM port is open."""
        return self._sock is not None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0 in tests)."""
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def close(self) -> None:
        """Stop accepting."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class ServesDicomPort:
    """Something that serves the DICOM port through its `listener` (the SCP itself, or the receiver pool)."""

    listener: DicomListener

    @property
    def listening(self) -> bool:
        """True while the DICOM port is open."""
        return self.listener.listening

    @property
    def port(self) -> int:
        """The bound port (useful with port 0 in tests)."""
        return self.listener.port


class DicomScp(ServesDicomPort):
    """C-STORE/C-ECHO SCP accepting one AE title per route plus the gateway's own."""

    def __init__(
        self,
        ae_title: str,
        routes: set[str],
        bind: tuple[str, int],
        temp_dir: Path,
        store: Callable[[Received], None],
        allowed_calling_ae: tuple[str, ...] = (),
        allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
        timeout: float = 60.0,
        maximum_associations: int = 32,
        on_refused: Callable[[], None] = lambda: None,
        on_ended: Callable[[], None] = lambda: None,
        on_association: Callable[[str, str, str, bool, str], None] = lambda *_: None,
        report_peers: dict[str, tuple[frozenset[str], str]] | None = None,
        report_box: ReportBox | None = None,
        on_report: Callable[[], None] = lambda: None,
    ) -> None:
        self.ae_title = ae_title
        # PACS we ask for storage commitment: AE title → (their addresses, the AE title they call us by)
        self.report_peers = report_peers or {}
        self.report_box = report_box
        self.on_report = on_report
        self.allowed_calling_ae = set(allowed_calling_ae)
        self.allowed_networks = allowed_networks
        self.accepted_called = {ae_title, *routes}
        self.store = store
        self.temp_dir = str(temp_dir)
        self.timeout = timeout
        self.maximum_associations = maximum_associations
        quiet_pynetdicom()
        temp_dir.mkdir(parents=True, exist_ok=True)
        self.supported_contexts: list[PresentationContext] = [
            build_context(str(cx.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES)
            for cx in AllStoragePresentationContexts
        ]
        self.supported_contexts.append(build_context(VERIFICATION, DEFAULT_TRANSFER_SYNTAXES))
        if self.report_peers:
            # the PACS sends its N-EVENT-REPORT as the SCP of Storage Commitment: accept that role
            commitment = build_context(STORAGE_COMMITMENT, DEFAULT_TRANSFER_SYNTAXES)
            commitment.scu_role = commitment.scp_role = True
            self.supported_contexts.append(commitment)
        self.listener = DicomListener(bind)
        self._lock = threading.Condition()
        self._active = 0  # established associations (the limit)
        self._connections = 0  # connections being served, established or not
        self.refused = 0
        self.on_refused = on_refused  # told of every refused C-STORE (counted by the main process)
        self.on_ended = on_ended  # told when an association's connection is closed
        # told of every association request: (calling AE, called AE, peer address, accepted, why refused);
        # a failed TLS handshake comes as ("", "", peer, False, "TLS handshake failed") (the audit trail's ear)
        self.on_association = on_association

    def is_report_peer(self, calling: str, peer: str) -> bool:
        """A PACS we ask for storage commitment, calling from one of its addresses."""
        known = self.report_peers.get(calling)
        return known is not None and peer in known[0]

    def may_store(self, calling: str, called: str, peer: str) -> bool:
        """Whether this peer may send C-STORE (the access policy; a report peer alone may not)."""
        return self._policy_refusal(calling, called, peer) is None

    def refusal(self, calling: str, called: str, peer: str) -> tuple[tuple[int, int, int], str] | None:
        """Why an association request must be rejected (A-ASSOCIATE-RJ result, source, reason), if it must. A
        PACS we asked for storage commitment may associate to report, by the AE title we call it with."""
        if self.is_report_peer(calling, peer) and called == self.report_peers[calling][1]:
            return None
        return self._policy_refusal(calling, called, peer)

    def _policy_refusal(
        self, calling: str, called: str, peer: str
    ) -> tuple[tuple[int, int, int], str] | None:
        if self.allowed_networks:
            try:
                ip = ipaddress.ip_address(peer)
            except ValueError:
                ip = None
            if ip is None or not any(ip in net for net in self.allowed_networks):
                return (0x01, 0x01, 0x01), "peer address not allowed"
        if self.allowed_calling_ae and calling not in self.allowed_calling_ae:
            return (0x01, 0x01, 0x03), f"calling AE title {calling!r} not allowed"
        if called not in self.accepted_called:
            return (0x01, 0x01, 0x07), f"called AE title {called!r} not configured"
        return None

    def give_slot(self, assoc: Association) -> None:
        """An association ended: its slot counts no more (once, however often this is called)."""
        with self._lock:
            if assoc.slot:
                assoc.slot = False
                self._active -= 1
                self._lock.notify_all()

    def take_slot(self) -> bool:
        """Count one more established association, unless the limit is reached."""
        with self._lock:
            if self._active >= self.maximum_associations:
                return False
            self._active += 1
            return True

    def handle_store(self, received: Received) -> int:
        """Hand one received file to the `store` callback; its outcome becomes the DIMSE status."""
        try:
            self.store(received)
        except Exception as exc:
            received.temp_path.unlink(missing_ok=True)
            return self.refuse(exc)
        return STATUS_SUCCESS

    def handle_report(
        self, calling: str, peer: str, data: bytes, transfer_syntax: str, event_type: int
    ) -> int:
        """A PACS's storage commitment report: saved durably before it is answered (N-EVENT-REPORT status)."""
        if self.report_box is None:
            return 0x0110
        try:
            report = parse_report(read_report_dataset(data, transfer_syntax), calling)
            self.report_box.save(report)
        except OSError as exc:
            log.error("storage commitment report from %s not saved: %s", calling, exc.strerror or exc)
            return 0x0110
        except Exception as exc:  # a malformed dataset, whatever pydicom makes of it
            log.warning("storage commitment report from %s unreadable: %s", calling, type(exc).__name__)
            return 0x0115
        log.info(
            "storage commitment report from %s (event %d): %d committed, %d failed",
            calling,
            event_type,
            len(report.committed),
            len(report.failed),
        )
        self.on_report()
        return STATUS_SUCCESS

    def refuse(self, exc: BaseException) -> int:
        """Count and log a refused C-STORE; its DIMSE status."""
        status = status_for(exc)
        self.refused += 1
        # NotDicomError and OSError texts carry no patient data; other exceptions are named by type only
        log.error(
            "C-STORE refused with 0x%04X: %s",
            status,
            exc if isinstance(exc, NotDicomError | OSError) else type(exc).__name__,
        )
        self.on_refused()
        return status

    def serve(self, conn: socket.socket, peer: str, tls: ssl.SSLContext | None = None) -> None:
        """Run one association on an accepted connection, in a thread of its own (after the TLS handshake, for a
        connection to the TLS port: a peer without TLS, or without a certificate the context accepts, is closed
        before any PDU is read)."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self.timeout)
        with self._lock:
            self._connections += 1
        threading.Thread(
            target=self._run_association, args=(conn, peer, tls), name="dicom-association", daemon=True
        ).start()

    def _run_association(self, conn: socket.socket, peer: str, tls: ssl.SSLContext | None = None) -> None:
        if tls is not None:
            try:
                conn = tls.wrap_socket(
                    conn, server_side=True
                )  # the handshake, bounded by the socket's timeout
            except (OSError, ssl.SSLError) as exc:
                log.warning(
                    "DICOM TLS handshake with %s failed: %s", peer, getattr(exc, "reason", None) or exc
                )
                self.on_association("", "", peer, False, "TLS handshake failed")
                with contextlib.suppress(OSError):
                    conn.close()
                with self._lock:
                    self._connections -= 1
                    self._lock.notify_all()
                self.on_ended()
                return
        assoc = Association(self, conn, peer)
        try:
            assoc.run()
        except Exception:
            log.exception("association from %s: unexpected error", peer)
        finally:
            self.give_slot(assoc)
            with self._lock:
                self._connections -= 1
                self._lock.notify_all()
            self.on_ended()

    def wait_idle(self) -> bool:
        """Wait until every connection has ended; each ends by itself (release, abort, or `timeout` of silence
        and then the wait for the peer to close). False if some are still running after that long."""
        with self._lock:
            return self._lock.wait_for(lambda: self._connections == 0, timeout=self.timeout + ARTIM + 5)

    def start(self) -> None:
        """Start listening on our own port (associations run in threads of their own)."""
        self.listener.open(self.serve)

    def stop(self) -> None:
        """Stop accepting; running associations end with their connections."""
        self.listener.close()
