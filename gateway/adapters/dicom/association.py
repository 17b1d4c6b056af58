"""One association (PS3.8), on a plain blocking socket in its own thread: set-up through pynetdicom's PDU classes
and `negotiate_as_acceptor`, then every P-DATA fragment of a dataset straight from the socket's buffer into the
instance's temporary file on D:, with a handful of Python operations per PDU (see the package docstring for why).
The `store` callback makes the instance durable before the status, the acknowledgement, is sent."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    negotiate_as_acceptor,
)

from gateway.adapters.dicom.codec import (
    ABORT,
    APPLICATION_CONTEXT,
    ASSOC_RQ,
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    MAX_ASSOCIATE_RQ,
    MAX_PDU_RECEIVED,
    P_DATA,
    RELEASE_RP,
    RELEASE_RQ,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    VERIFICATION,
    ProtocolError,
    a_abort,
    command_ui,
    command_us,
    file_meta,
    p_data,
    parse_command,
    response_command,
)
from gateway.adapters.dicom.commitment import MAX_REPORT
from gateway.core.dicominfo import NotDicomError
from gateway.storage import start_writeback, write_all

if TYPE_CHECKING:
    from gateway.adapters.dicom.scp import DicomScp

log = logging.getLogger(__name__)


_READ_BUFFER = 1 << 20

ARTIM = 5.0  # seconds we wait for the peer to close after our last PDU


@dataclass(frozen=True)
class Received:
    """What the SCP knows about one C-STORE beyond the file itself."""

    temp_path: Path
    called_ae: str
    calling_ae: str
    peer: str
    sha256: str | None = None  # of the whole file, computed while it was written (no second read)
    size: int | None = None


def status_for(exc: BaseException) -> int:
    """The one place where failures become DIMSE statuses."""
    if isinstance(exc, NotDicomError):
        return STATUS_CANNOT_UNDERSTAND
    if isinstance(exc, OSError):  # ENOSPC, EDQUOT, the free-space reserve, I/O errors: the modality may retry
        return STATUS_OUT_OF_RESOURCES
    return STATUS_PROCESSING_FAILURE


class _PeerGone(Exception):
    """The peer closed the connection or went silent."""


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
        write_all(self.file, data)
        self.digest.update(data)
        before = self.size
        self.size += len(data)
        # the fsync before the acknowledgement has less left to wait for
        if (self.size >> 18) != (before >> 18):
            start_writeback(self.file.fileno())

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


@dataclass
class _Report:
    """One N-EVENT-REPORT in progress: its command and its dataset, held in memory (bounded by MAX_REPORT)."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    event_type: int
    data: bytearray = field(default_factory=bytearray)


class Association:
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
        self.report: _Report | None = None  # an N-EVENT-REPORT whose dataset is arriving
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
                if pdu_type == P_DATA:
                    if length > MAX_PDU_RECEIVED + 6:
                        raise ProtocolError(
                            f"P-DATA-TF of {length} bytes exceeds the announced maximum", 0x06
                        )
                    self._p_data(length)
                elif pdu_type == RELEASE_RQ:
                    if length > 64:
                        raise ProtocolError("oversized A-RELEASE-RQ", 0x06)
                    self._read(length)
                    # the slot is free before the peer learns the association ended: a peer that associates
                    # again at once must find it free (not wait for our side of the TCP close)
                    self.scp.give_slot(self)
                    self.sock.sendall(RELEASE_RP)
                    return
                elif pdu_type == ABORT:
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
            self.sock.settimeout(ARTIM)
            deadline = time.monotonic() + ARTIM
            while time.monotonic() < deadline and self.sock.recv(65536):
                pass
        with contextlib.suppress(OSError):
            self.rfile.close()
            self.sock.close()

    def _associate(self) -> bool:
        pdu_type, length = self._pdu_header()
        if pdu_type != ASSOC_RQ:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", 0x02)
        if length > MAX_ASSOCIATE_RQ:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes", 0x06)
        raw = self._read(length)
        try:
            rq_pdu = A_ASSOCIATE_RQ()
            rq_pdu.decode(bytes([ASSOC_RQ, 0]) + length.to_bytes(4, "big") + raw)
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
            self.scp.on_association(self.calling, self.called, self.peer, False, why)
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
        self.scp.on_association(self.calling, self.called, self.peer, True, "")
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
        if self.store is not None or self.report is not None:
            raise ProtocolError("a command fragment in the middle of a dataset", 0x02)
        self.command += fragment
        if len(self.command) > 64 * 1024:
            raise ProtocolError("command set larger than 64 KiB", 0x06)
        if not last:
            return
        cmd = parse_command(bytes(self.command))
        self.command.clear()
        command_field, message_id = command_us(cmd, 0x0100), command_us(cmd, 0x0110)
        has_data = command_us(cmd, 0x0800) != 0x0101
        abstract, transfer_syntax = self.contexts[context_id]
        if command_field == 0x0030 and not has_data:  # C-ECHO-RQ
            self.sock.sendall(p_data(context_id, response_command(0x8030, message_id, VERIFICATION, 0, "")))
            return
        if command_field == 0x0100 and has_data:  # N-EVENT-REPORT-RQ: a PACS's storage commitment report
            if not self.scp.is_report_peer(self.calling, self.peer):
                raise ProtocolError(
                    "N-EVENT-REPORT from a peer that is no PACS we asked for commitment", 0x02
                )
            self.report = _Report(
                context_id,
                message_id,
                command_ui(cmd, 0x0002),
                command_ui(cmd, 0x1000),
                command_us(cmd, 0x1002),
            )
            return
        if command_field != 0x0001 or not has_data:
            raise ProtocolError(f"DIMSE command 0x{command_field:04X} is not offered here", 0x02)
        if not self.scp.may_store(self.calling, self.called, self.peer):
            raise ProtocolError("C-STORE from a peer admitted for commitment reports only", 0x02)
        sop_class, sop_instance = command_ui(cmd, 0x0002), command_ui(cmd, 0x1000)
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
        if self.report is not None:
            self._report_fragment(context_id, fragment, last)
            return
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

    def _report_fragment(self, context_id: int, fragment: bytes, last: bool) -> None:
        report = self.report
        assert report is not None
        if report.context_id != context_id:
            raise ProtocolError("a dataset fragment on another presentation context", 0x02)
        report.data += fragment
        if len(report.data) > MAX_REPORT:
            raise ProtocolError("N-EVENT-REPORT dataset too large", 0x06)
        if not last:
            return
        self.report = None
        status = self.scp.handle_report(
            self.calling, self.peer, bytes(report.data), self.contexts[context_id][1], report.event_type
        )
        rsp = response_command(
            0x8100, report.message_id, report.sop_class, status, report.sop_instance, report.event_type
        )
        self.sock.sendall(p_data(context_id, rsp))

    def _discard_store(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            store.drop(None)
