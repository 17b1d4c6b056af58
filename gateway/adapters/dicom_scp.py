"""The DICOM edge: a pynetdicom C-STORE / C-ECHO SCP. Owns associations, nothing else.

Handlers stay small (pynetdicom's model): the Called AE Title decides the route at association time
(an unknown one is rejected with A-ASSOCIATE-RJ "called AE title not recognised"); the C-STORE handler hands
the received file to a `store` callback and maps its outcome to a DIMSE status in one place (`_status_for`).

pynetdicom runs one thread per association; the `store` callback runs in that thread and must make the instance
durable before it returns, because the returned status is the acknowledgement to the modality.
"""

from __future__ import annotations

import ipaddress
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom._globals import ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.core.dicominfo import NotDicomError

log = logging.getLogger(__name__)

_UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
# pynetdicom accepts the first of *our* syntaxes that the modality proposed. Compressed ones first, then explicit
# before implicit, so a modality that offers what its file holds gets it accepted as-is: no conversion anywhere.
ACCEPTED_TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED] + _UNCOMPRESSED

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110


def quiet_pynetdicom() -> None:
    """pynetdicom logs identifiers (patient name/ID) by default: switch that off for good."""
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").propagate = True


@dataclass(frozen=True)
class Received:
    """What the SCP knows about one C-STORE beyond the file itself."""

    temp_path: Path
    called_ae: str
    calling_ae: str
    peer: str


def _status_for(exc: BaseException) -> int:
    """The one place where failures become DIMSE statuses."""
    if isinstance(exc, NotDicomError):
        return STATUS_CANNOT_UNDERSTAND
    if isinstance(exc, OSError):  # ENOSPC, EDQUOT, the free-space reserve, I/O errors: the modality may retry
        return STATUS_OUT_OF_RESOURCES
    return STATUS_PROCESSING_FAILURE


class DicomScp:
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
    ) -> None:
        self.ae_title = ae_title
        self.allowed_calling_ae = set(allowed_calling_ae)
        self.allowed_networks = allowed_networks
        self.accepted_called = {ae_title, *routes}
        self.bind = bind
        self.store = store
        quiet_pynetdicom()
        # Receive datasets straight into a file on D: (flat memory, rename stays on one filesystem).
        _config.STORE_RECV_CHUNKED_DATASET = True
        temp_dir.mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = str(temp_dir)
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
        self.ae.require_called_aet = True
        self.ae.maximum_associations = 32
        # an association that goes silent (abandoned, half-open) is dropped after `timeout` seconds
        self.ae.network_timeout = timeout
        self.ae.acse_timeout = timeout
        self.ae.dimse_timeout = timeout
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            self.ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._server: Any = None
        self.refused = 0

    def _refusal(self, calling: str, called: str, peer: str) -> tuple[tuple[int, int, int], str] | None:
        """Why an association request must be rejected (A-ASSOCIATE-RJ result, source, reason), if it must."""
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

    def _on_requested(self, event: evt.Event) -> None:
        primitive = event.assoc.requestor.primitive
        called = primitive.called_ae_title.strip() if primitive is not None else ""
        calling = primitive.calling_ae_title.strip() if primitive is not None else ""
        peer = str(event.assoc.requestor.address)
        refusal = self._refusal(calling, called, peer)
        if refusal is None:
            # pynetdicom checks the Called AE against the acceptor's title (require_called_aet).
            event.assoc.acceptor.ae_title = called
            return
        (result, source, reason), why = refusal
        log.warning("association from %s rejected: %s", peer, why)
        event.assoc.acse.send_reject(result, source, reason)
        # as pynetdicom's own rejections do: wait for the DUL to put the A-ASSOCIATE-RJ on the wire
        event.assoc.kill()

    def _on_store(self, event: evt.Event) -> int:
        assoc = event.assoc
        path = Path(event.dataset_path)
        try:
            self.store(
                Received(
                    temp_path=path,
                    called_ae=assoc.acceptor.ae_title.strip(),
                    calling_ae=assoc.requestor.ae_title.strip(),
                    peer=str(assoc.requestor.address),
                )
            )
        except Exception as exc:
            status = _status_for(exc)
            self.refused += 1
            # NotDicomError and OSError texts carry no patient data; other exceptions are named by type only
            log.error(
                "C-STORE refused with 0x%04X: %s",
                status,
                exc if isinstance(exc, NotDicomError | OSError) else type(exc).__name__,
            )
            path.unlink(missing_ok=True)
            return status
        return STATUS_SUCCESS

    def start(self) -> None:
        """Start listening (non-blocking; associations run in pynetdicom's threads)."""
        handlers: list[Any] = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store)]
        self._server = self.ae.start_server(self.bind, block=False, evt_handlers=handlers)
        sock = self._server.socket
        import socket as _s

        sock.setsockopt(_s.IPPROTO_TCP, _s.TCP_NODELAY, 1)

    @property
    def listening(self) -> bool:
        """True while the DICOM port is open."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0 in tests)."""
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting; running associations are aborted."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
