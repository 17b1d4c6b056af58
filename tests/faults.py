"""Injected mail-node faults that a healthy real server cannot show: silence, a foreign certificate, 421."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@contextlib.contextmanager
def silent_listener(host: str, port: int) -> Iterator[list[socket.socket]]:
    """Accepts TCP connections and never says a word (a hung node)."""
    srv = socket.create_server((host, port), reuse_port=False)
    held: list[socket.socket] = []
    stop = threading.Event()

    def run() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = srv.accept()
                held.append(conn)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield held
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        srv.close()


@dataclass
class FakeSmtp:
    """A minimal SMTP peer: `mode` 'rogue-tls' (STARTTLS with a certificate from another CA) or '421'."""

    host: str
    port: int
    mode: str
    cert: Path | None = None
    key: Path | None = None
    plaintext_mail_from: bool = False
    sessions: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> FakeSmtp:
        self._srv = socket.create_server((self.host, self.port))
        self._srv.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._srv.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except (TimeoutError, OSError):
                continue
            self.sessions += 1
            with contextlib.suppress(OSError, ssl.SSLError):
                self._session(conn)
            conn.close()

    def _session(self, conn: socket.socket) -> None:
        """'rogue-tls': STARTTLS with a certificate the client must not trust. '421': STARTTLS with a valid
        certificate, then 421 at MAIL FROM (a node shutting down mid-session)."""
        sock: socket.socket = conn
        sock.settimeout(5)
        f = sock.makefile("rb")
        sock.sendall(b"220 fake ESMTP\r\n")
        tls_up = False
        while line := f.readline():
            verb = line.split(b" ")[0].strip().upper()
            if verb in (b"EHLO", b"HELO"):
                sock.sendall(b"250-fake\r\n250 STARTTLS\r\n" if not tls_up else b"250 fake\r\n")
            elif verb == b"STARTTLS":
                sock.sendall(b"220 go ahead\r\n")
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(str(self.cert), str(self.key))
                sock = ctx.wrap_socket(
                    conn, server_side=True
                )  # raises when the client refuses our certificate
                f = sock.makefile("rb")
                tls_up = True
            elif verb == b"MAIL":
                self.plaintext_mail_from = self.plaintext_mail_from or not tls_up
                sock.sendall(b"421 4.3.2 service shutting down\r\n")
                return
            elif verb == b"QUIT":
                sock.sendall(b"221 bye\r\n")
                return
            else:
                sock.sendall(b"502 no\r\n")


@contextlib.contextmanager
def refusing_pacs(port: int, refuse_modality: str = "MR") -> Iterator[list[str]]:
    """A PACS that answers C-STORE with 0xA700 (out of resources) for one modality, success otherwise."""
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    from gateway.adapters.dicom import ACCEPTED_TRANSFER_SYNTAXES

    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        if ds.get("Modality") == refuse_modality:
            return 0xA700
        received.append(str(ds.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="REFUSER")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield received
    finally:
        server.shutdown()


@contextlib.contextmanager
def aborting_pacs(port: int) -> Iterator[list[str]]:
    """A PACS that accepts the association and then aborts it at the first C-STORE (as some PACS refuse)."""
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    from gateway.adapters.dicom import ACCEPTED_TRANSFER_SYNTAXES

    seen: list[str] = []

    def on_store(event: evt.Event) -> int:
        seen.append(str(event.request.AffectedSOPInstanceUID))
        event.assoc.abort()
        return 0xC000

    ae = AE(ae_title="ABORTER")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield seen
    finally:
        server.shutdown()


@contextlib.contextmanager
def committing_pacs(port: int, lose_modality: str = "") -> Iterator[dict[str, list[str]]]:
    """A PACS that reports storage commitment on the same association, as dcm4chee and others do while it is open
    (Orthanc never does): it answers the N-ACTION, then sends the N-EVENT-REPORT on that association. Instances of
    `lose_modality` are answered C-STORE Success and then lost, so its report lists them as failed (0x0112)."""
    import threading

    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    from gateway.adapters.dicom import ACCEPTED_TRANSFER_SYNTAXES
    from gateway.adapters.dicom.commitment import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE

    seen: dict[str, list[str]] = {"stored": [], "reported": []}
    asked: dict[int, Dataset] = {}

    def on_store(event: evt.Event) -> int:
        if event.dataset.get("Modality") != lose_modality:
            seen["stored"].append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    def on_action(event: evt.Event) -> tuple[int, None]:
        asked[id(event.assoc)] = event.action_information
        return 0x0000, None

    def report(assoc: object, request: Dataset) -> None:
        ds = Dataset()
        ds.TransactionUID = request.TransactionUID
        ok, failed = [], []
        for ref in request.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            if str(ref.ReferencedSOPInstanceUID) in seen["stored"]:
                ok.append(item)
            else:
                item.FailureReason = 0x0112
                failed.append(item)
        ds.ReferencedSOPSequence = ok
        if failed:
            ds.FailedSOPSequence = failed
        assoc.send_n_event_report(  # type: ignore[attr-defined]
            ds, 2 if failed else 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
        seen["reported"].append(str(request.TransactionUID))

    def on_sent(event: evt.Event) -> None:
        # once the N-ACTION-RSP is out, the report follows on the same association
        if type(event.message).__name__ == "N_ACTION_RSP" and id(event.assoc) in asked:
            request = asked.pop(id(event.assoc))
            threading.Thread(target=report, args=(event.assoc, request), daemon=True).start()

    ae = AE(ae_title="COMMITTER")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(STORAGE_COMMITMENT)
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_N_ACTION, on_action),
            (evt.EVT_DIMSE_SENT, on_sent),
        ],
    )
    try:
        yield seen
    finally:
        server.shutdown()
