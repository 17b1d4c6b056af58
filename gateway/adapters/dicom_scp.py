"""The DICOM edge: a C-STORE / C-ECHO SCP. Owns associations, nothing else.

The association dialogue (PS3.8) runs here on plain blocking sockets, one thread per association. The PDUs of
association set-up are decoded and encoded with pynetdicom's own PDU classes, and presentation contexts are
negotiated with pynetdicom's `negotiate_as_acceptor`; the file meta is written as pydicom writes pynetdicom's
`create_file_meta` (a test compares them). What is ours is the data path: every P-DATA fragment of a dataset goes straight from the socket's buffer
into the instance's temporary file on D:, with a handful of Python operations per PDU. pynetdicom's own DUL
(a reactor thread per association, an event queue and a state machine step per PDU, 1 ms polling sleeps) made
reception CPU-bound at about 120 instances per second, whatever the disks could do (see README, Performance).

The Called AE Title decides the route at association time (an unknown one is rejected with A-ASSOCIATE-RJ
"called AE title not recognised"); the C-STORE handler hands the received file to a `store` callback and maps its
outcome to a DIMSE status in one place (`_status_for`).

The `store` callback runs in the association's thread and must make the instance durable before it returns,
because the returned status is the acknowledgement to the modality.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import logging
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config
from pynetdicom._globals import ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
    negotiate_as_acceptor,
)

from gateway.core.dicominfo import NotDicomError

log = logging.getLogger(__name__)

_UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
# The first of *our* syntaxes that the modality proposed is accepted. Compressed ones first, then explicit
# before implicit, so a modality that offers what its file holds gets it accepted as-is: no conversion anywhere.
ACCEPTED_TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED] + _UNCOMPRESSED
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# the same implementation identity as pynetdicom's SCU and the file meta it writes
IMPLEMENTATION_UID = PYNETDICOM_IMPLEMENTATION_UID
IMPLEMENTATION_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0x0110

# What we announce as our largest PDU (the modality sends at most this much at a time; DCMTK's default is 16 KiB)
MAX_PDU_RECEIVED = 4 * 1024 * 1024
MAX_ASSOCIATE_RQ = 256 * 1024  # a request with every storage class and every transfer syntax is about 60 KB
_READ_BUFFER = 1 << 20
_ARTIM = 5.0  # seconds we wait for the peer to close after our last PDU


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


# Linux: the kernel starts writing a file's pages while the rest of the dataset still arrives, so the fsync
# before the acknowledgement has less left to wait for.
_sync_file_range = _libc_sync_file_range()

_P_DATA, _ASSOC_RQ, _RELEASE_RQ, _ABORT = 0x04, 0x01, 0x05, 0x07
_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def quiet_pynetdicom() -> None:
    """pynetdicom logs identifiers (patient name/ID) by default: switch that off for good (the SCU uses it)."""
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
    sha256: str | None = None  # of the whole file, computed while it was written (no second read)
    size: int | None = None


def _status_for(exc: BaseException) -> int:
    """The one place where failures become DIMSE statuses."""
    if isinstance(exc, NotDicomError):
        return STATUS_CANNOT_UNDERSTAND
    if isinstance(exc, OSError):  # ENOSPC, EDQUOT, the free-space reserve, I/O errors: the modality may retry
        return STATUS_OUT_OF_RESOURCES
    return STATUS_PROCESSING_FAILURE


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol: the association is aborted (A-P-ABORT with `reason`)."""

    def __init__(self, why: str, reason: int = 0x02) -> None:
        super().__init__(why)
        self.reason = reason


class _PeerGone(Exception):
    """The peer closed the connection or went silent."""


# ------------------------------------------------------------------------------------------ DIMSE command sets
def parse_command(data: bytes) -> dict[int, bytes]:
    """The elements of a command set (group 0000, Implicit VR Little Endian) by element number."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise ProtocolError("command set cut short", 0x06)
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or length > end - pos:
            raise ProtocolError("malformed command set", 0x06)
        out[element] = data[pos : pos + length]
        pos += length
    return out


def _us(cmd: dict[int, bytes], element: int) -> int:
    value = cmd.get(element, b"")
    if len(value) != 2:
        raise ProtocolError(f"command element (0000,{element:04X}) missing or not US", 0x06)
    return int(struct.unpack("<H", value)[0])


def _ui(cmd: dict[int, bytes], element: int) -> str:
    return cmd.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def response_command(
    command_field: int, message_id: int, sop_class: str, status: int, sop_instance: str
) -> bytes:
    """A C-STORE-RSP / C-ECHO-RSP command set (no dataset follows)."""
    body = _element(0x0002, _uid_value(sop_class))
    body += _element(0x0100, struct.pack("<H", command_field))
    body += _element(0x0120, struct.pack("<H", message_id))
    body += _element(0x0800, struct.pack("<H", 0x0101))
    body += _element(0x0900, struct.pack("<H", status))
    if sop_instance:
        body += _element(0x1000, _uid_value(sop_instance))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, tag, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, tag, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (Explicit VR Little Endian), as pydicom writes it
    for pynetdicom's `create_file_meta` (a test compares the two); by hand because this runs for every instance."""
    version = IMPLEMENTATION_VERSION.encode("ascii")
    body = (
        _meta_element(0x0001, b"OB", b"\x00\x01")
        + _meta_element(0x0002, b"UI", _uid_value(sop_class))
        + _meta_element(0x0003, b"UI", _uid_value(sop_instance))
        + _meta_element(0x0010, b"UI", _uid_value(transfer_syntax))
        + _meta_element(0x0012, b"UI", _uid_value(IMPLEMENTATION_UID))
        + _meta_element(0x0013, b"SH", version + b" " if len(version) % 2 else version)
    )
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU holding a whole command set as its last fragment."""
    pdv = bytes([context_id, 0x03]) + command
    return struct.pack(">BBII", _P_DATA, 0, len(pdv) + 4, len(pdv)) + pdv


def a_abort(source: int, reason: int) -> bytes:
    """An A-ABORT PDU (source 0 = service user, 2 = service provider)."""
    return struct.pack(">BBIBBBB", _ABORT, 0, 4, 0, 0, source, reason)


# ------------------------------------------------------------------------------------------------ associations
@dataclass
class _Store:
    """One C-STORE in progress: its command and the temporary file its dataset streams into."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    path: Path | None  # None: the temporary file could not be made (error says why)
    file: BinaryIO | None
    error: OSError | None = None
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0

    def write(self, data: bytes) -> None:
        """Append to the temporary file, hashing as it goes; start writing it to disk every 256 KiB."""
        assert self.file is not None
        view = memoryview(data)
        while view:  # an unbuffered file may take less than it was given
            view = view[self.file.write(view) :]
        self.digest.update(data)
        before = self.size
        self.size += len(data)
        if _sync_file_range is not None and (self.size >> 18) != (before >> 18):
            _sync_file_range(self.file.fileno(), 0, 0, 2)  # SYNC_FILE_RANGE_WRITE: no waiting

    def drop(self, error: OSError | None) -> None:
        """Give up the temporary file (closed, removed); `error`, if any, is what the C-STORE is refused for."""
        if error is not None:
            self.error = error
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _Association:
    """One association on one socket, in its own thread."""

    def __init__(self, scp: DicomScp, sock: socket.socket, peer: str) -> None:
        self.scp = scp
        self.sock = sock
        self.peer = peer
        self.rfile = sock.makefile("rb", buffering=_READ_BUFFER)
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted: id → (abstract syntax, transfer syntax)
        self.calling = self.called = ""
        self.command = bytearray()
        self.store: _Store | None = None
        self.slot = False  # counts towards the association limit

    # ---- low level
    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            raise _PeerGone("connection closed")
        return data

    def _pdu_header(self) -> tuple[int, int]:
        try:
            head = self.rfile.read(6)
        except (TimeoutError, OSError) as exc:
            raise _PeerGone(str(exc) or type(exc).__name__) from None
        if len(head) != 6:
            raise _PeerGone("connection closed")
        return head[0], int.from_bytes(head[2:6], "big")

    # ---- the dialogue
    def run(self) -> None:
        try:
            if not self._associate():
                return
            while True:
                pdu_type, length = self._pdu_header()
                if pdu_type == _P_DATA:
                    if length > MAX_PDU_RECEIVED + 6:
                        raise ProtocolError(
                            f"P-DATA-TF of {length} bytes exceeds the announced maximum", 0x06
                        )
                    self._p_data(length)
                elif pdu_type == _RELEASE_RQ:
                    if length > 64:
                        raise ProtocolError("oversized A-RELEASE-RQ", 0x06)
                    self._read(length)
                    # the slot is free before the peer learns the association ended: a peer that associates
                    # again at once must find it free (not wait for our side of the TCP close)
                    self.scp.give_slot(self)
                    self.sock.sendall(_RELEASE_RP)
                    return
                elif pdu_type == _ABORT:
                    log.info("association from %s aborted by the peer", self.peer)
                    return
                else:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}", 0x02)
        except ProtocolError as exc:
            log.warning("association from %s aborted: %s", self.peer, exc)
            with contextlib.suppress(OSError):
                self.sock.sendall(a_abort(2, exc.reason))
        except _PeerGone as exc:
            log.info("association from %s ended: %s", self.peer, exc)
        except OSError as exc:
            log.info("association from %s ended: %s", self.peer, exc)
        finally:
            self._discard_store()
            self.scp.give_slot(self)
            self._close()

    def _close(self) -> None:
        """End the connection as PS3.8 wants the acceptor to: after our last PDU (A-ASSOCIATE-RJ, A-RELEASE-RP,
        A-ABORT) the requestor closes, and we wait for that (bounded, like the ARTIM timer). Closing at once could
        make the kernel reset the connection before the peer has read the PDU, so a rejected peer saw an abort."""
        # No half-close first: PS3.8 (AR-3, AA-1, the ARTIM timer) has the requestor close the connection after
        # our last PDU. Sending our FIN at once let a loaded requestor see "connection closed" before it had
        # handled the A-ASSOCIATE-RJ in it (pynetdicom then reported neither a rejection nor an abort).
        with contextlib.suppress(OSError):
            self.sock.settimeout(_ARTIM)
            deadline = time.monotonic() + _ARTIM
            while time.monotonic() < deadline and self.sock.recv(65536):
                pass
        with contextlib.suppress(OSError):
            self.rfile.close()
            self.sock.close()

    def _associate(self) -> bool:
        pdu_type, length = self._pdu_header()
        if pdu_type != _ASSOC_RQ:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", 0x02)
        if length > MAX_ASSOCIATE_RQ:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes", 0x06)
        raw = self._read(length)
        try:
            rq_pdu = A_ASSOCIATE_RQ()
            rq_pdu.decode(bytes([_ASSOC_RQ, 0]) + length.to_bytes(4, "big") + raw)
            rq = rq_pdu.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__})", 0x06) from None
        self.calling = str(rq.calling_ae_title).strip()
        self.called = str(rq.called_ae_title).strip()
        refusal = self.scp.refusal(self.calling, self.called, self.peer)
        if refusal is None and str(rq.application_context_name) != APPLICATION_CONTEXT:
            refusal = (0x01, 0x01, 0x02), "application context not supported"
        if refusal is None:
            self.slot = self.scp.take_slot()
            if not self.slot:
                refusal = (0x02, 0x03, 0x02), "too many associations"
        if refusal is not None:
            (result, source, reason), why = refusal
            log.warning("association from %s rejected: %s", self.peer, why)
            rj = A_ASSOCIATE()
            rj.result, rj.result_source, rj.diagnostic = result, source, reason
            pdu = A_ASSOCIATE_RJ()
            pdu.from_primitive(rj)
            self.sock.sendall(pdu.encode())
            return False
        return self._accept(rq)

    def _accept(self, rq: A_ASSOCIATE) -> bool:
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in rq.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
        }
        results, ac_roles = negotiate_as_acceptor(
            rq.presentation_context_definition_list, self.scp.supported_contexts, roles or None
        )
        for cx in results:
            if cx.result == 0x00 and cx.context_id is not None:
                self.contexts[int(cx.context_id)] = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        ac = A_ASSOCIATE()
        ac.application_context_name = UID(APPLICATION_CONTEXT)
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = results
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = MAX_PDU_RECEIVED
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_UID
        impl_version = ImplementationVersionNameNotification()
        impl_version.implementation_version_name = IMPLEMENTATION_VERSION
        ac.user_information = [max_len, impl_uid, impl_version, *ac_roles]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self.sock.sendall(pdu.encode())
        log.debug("association from %s (%s → %s) accepted", self.peer, self.calling, self.called)
        return True

    def _p_data(self, length: int) -> None:
        left = length
        while left > 0:
            if left < 6:
                raise ProtocolError("P-DATA-TF with a truncated PDV item", 0x06)
            item_len, context_id, control = struct.unpack(">IBB", self._read(6))
            left -= 4 + item_len
            if item_len < 2 or left < 0:
                raise ProtocolError("PDV item length does not fit its PDU", 0x06)
            if context_id not in self.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, which was not accepted", 0x06)
            fragment = self._read(item_len - 2)
            if control & 0x01:
                self._command_fragment(context_id, fragment, last=bool(control & 0x02))
            else:
                self._data_fragment(context_id, fragment, last=bool(control & 0x02))

    def _command_fragment(self, context_id: int, fragment: bytes, last: bool) -> None:
        if self.store is not None:
            raise ProtocolError("a command fragment in the middle of a dataset", 0x02)
        self.command += fragment
        if len(self.command) > 64 * 1024:
            raise ProtocolError("command set larger than 64 KiB", 0x06)
        if not last:
            return
        cmd = parse_command(bytes(self.command))
        self.command.clear()
        command_field, message_id = _us(cmd, 0x0100), _us(cmd, 0x0110)
        has_data = _us(cmd, 0x0800) != 0x0101
        abstract, transfer_syntax = self.contexts[context_id]
        if command_field == 0x0030 and not has_data:  # C-ECHO-RQ
            self.sock.sendall(p_data(context_id, response_command(0x8030, message_id, VERIFICATION, 0, "")))
            return
        if command_field != 0x0001 or not has_data:
            raise ProtocolError(f"DIMSE command 0x{command_field:04X} is not offered here", 0x02)
        sop_class, sop_instance = _ui(cmd, 0x0002), _ui(cmd, 0x1000)
        try:
            fd, name = tempfile.mkstemp(suffix=".dcm", dir=self.scp.temp_dir)
        except OSError as exc:  # no inode left, temp folder gone: read the dataset, then answer 0xA700
            self.store = _Store(context_id, message_id, sop_class or abstract, sop_instance, None, None, exc)
            return
        f = os.fdopen(fd, "wb", buffering=0)
        self.store = _Store(context_id, message_id, sop_class or abstract, sop_instance, Path(name), f)
        try:
            self.store.write(file_meta(sop_class or abstract, sop_instance, transfer_syntax))
        except OSError as exc:
            self._write_failed(exc)

    def _data_fragment(self, context_id: int, fragment: bytes, last: bool) -> None:
        store = self.store
        if store is None or store.context_id != context_id:
            raise ProtocolError("a dataset fragment without its C-STORE command", 0x02)
        if store.file is not None:
            try:
                store.write(fragment)
            except OSError as exc:  # disk full mid-dataset: read the rest, then answer 0xA700
                self._write_failed(exc)
        if last:
            self._finish_store(store)

    def _write_failed(self, exc: OSError) -> None:
        assert self.store is not None
        self.store.drop(exc)

    def _finish_store(self, store: _Store) -> None:
        self.store = None
        if store.file is not None:
            try:
                store.file.close()
                store.file = None
            except OSError as exc:
                store.drop(exc)
        if store.error is not None:
            status = self.scp.refuse(store.error)
        else:
            assert store.path is not None  # only a store that failed to make its file has none
            status = self.scp.handle_store(
                Received(
                    temp_path=store.path,
                    called_ae=self.called,
                    calling_ae=self.calling,
                    peer=self.peer,
                    sha256=store.digest.hexdigest(),
                    size=store.size,
                )
            )
        rsp = response_command(0x8001, store.message_id, store.sop_class, status, store.sop_instance)
        self.sock.sendall(p_data(store.context_id, rsp))

    def _discard_store(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            store.drop(None)


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
    ) -> None:
        self.ae_title = ae_title
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
        self.listener = DicomListener(bind)
        self._lock = threading.Condition()
        self._active = 0  # established associations (the limit)
        self._connections = 0  # connections being served, established or not
        self.refused = 0
        self.on_refused = on_refused  # told of every refused C-STORE (counted by the main process)
        self.on_ended = on_ended  # told when an association's connection is closed

    def refusal(self, calling: str, called: str, peer: str) -> tuple[tuple[int, int, int], str] | None:
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

    def give_slot(self, assoc: _Association) -> None:
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

    def refuse(self, exc: BaseException) -> int:
        """Count and log a refused C-STORE; its DIMSE status."""
        status = _status_for(exc)
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
                with contextlib.suppress(OSError):
                    conn.close()
                with self._lock:
                    self._connections -= 1
                    self._lock.notify_all()
                self.on_ended()
                return
        assoc = _Association(self, conn, peer)
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
            return self._lock.wait_for(lambda: self._connections == 0, timeout=self.timeout + _ARTIM + 5)

    def start(self) -> None:
        """Start listening on our own port (associations run in threads of their own)."""
        self.listener.open(self.serve)

    def stop(self) -> None:
        """Stop accepting; running associations end with their connections."""
        self.listener.close()
