"""Contracts with the libraries whose internals the gateway reaches into (fast, in-process peers, no root).

Each adapter that patches or calls a private part of a library says so in its module; here each such use is
exercised against a real peer of that protocol running in this process, so that an upgrade which moves or changes
the internal fails here, loudly and by name, instead of as a lost or garbled mail in production:

- aiosmtplib: our DATA path for ready mails (``_command_lock``, ``_drain_helper``, ``_response_pending``,
  ``read_response``) and the skipped whole-message rewrites, against aiosmtpd;
- poplib: our RETR reader on poplib's ``sock``/``file`` and ``_shortcmd`` for AUTH EXTERNAL, and ``_MAXLINE``,
  against a small POP3 server;
- aioimaplib: ``Command``, ``new_tag``, ``execute`` and the ``AUTH`` state used for AUTHENTICATE EXTERNAL;
- pynetdicom: the ``_config`` switches the SCP and the forwarder set, and a chunked C-STORE to a pynetdicom SCP.
"""

from __future__ import annotations

import asyncio
import inspect
import poplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import aioimaplib
import aiosmtplib
import aiosmtplib.protocol
import pytest
from aiosmtpd.controller import Controller

from gateway.adapters import pop3, smtp
from gateway.config import Node
from tests.ports import free_port

# ------------------------------------------------------------------------------------------------ aiosmtplib


class _Keep:
    """aiosmtpd handler that keeps what arrived after DATA."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.received.append(envelope.original_content)  # type: ignore[attr-defined]
        return "250 OK kept"


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, _Keep]]:
    handler = _Keep()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False, data_size_limit=0)
    controller.start()
    try:
        yield port, handler
    finally:
        controller.stop()


def test_aiosmtplib_still_has_the_internals_our_data_path_uses() -> None:
    proto = aiosmtplib.protocol.SMTPProtocol
    for name in ("read_response", "write", "_drain_helper", "execute_data_command"):
        assert callable(getattr(proto, name, None)), f"aiosmtplib.protocol.SMTPProtocol.{name} is gone"
    made = proto(loop=asyncio.new_event_loop())
    for attr in ("_command_lock", "_response_pending"):
        assert hasattr(made, attr), f"aiosmtplib.protocol.SMTPProtocol().{attr} is gone"
    assert list(inspect.signature(smtp._execute_data).parameters)[:3] == ["self", "message", "timeout"]
    assert hasattr(aiosmtplib.smtp, "normalize_message_line_endings")
    assert callable(getattr(smtp._period, "sub", None))


@pytest.mark.asyncio
async def test_a_ready_mail_goes_through_our_data_path_byte_for_byte(smtp_server) -> None:  # type: ignore[no-untyped-def]
    port, handler = smtp_server
    body = b"".join(b"line %06d of a base64 body ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n" % i for i in range(20_000))
    mail = b"From: a@x.test\r\nTo: b@x.test\r\nSubject: t\r\n\r\n" + body  # > one 256 KiB piece
    ready = smtp.prepare(mail)
    assert isinstance(ready, smtp.WireReady)
    other = b"From: a@x.test\r\nTo: b@x.test\r\n\r\n.leading dot\nbare LF\r\n"
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=20)
    async with client:
        await client.sendmail("a@x.test", ["b@x.test"], ready)
        await client.sendmail("a@x.test", ["b@x.test"], smtp.prepare(other))
    assert handler.received[0] == mail  # our pieces, unstuffed, arrived whole
    # a mail that is not ready still gets aiosmtplib's own line-end and dot handling (the server undoes the dot)
    assert handler.received[1] == b"From: a@x.test\r\nTo: b@x.test\r\n\r\n.leading dot\r\nbare LF\r\n"


@pytest.mark.asyncio
async def test_a_mail_marked_ready_is_sent_as_the_bytes_read_in_pieces(smtp_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The send stage marks a mail the packager checked instead of copying it into a WireReady: while it is
    marked, aiosmtplib's own DATA path (one copy, one write) is never taken; once sent, the mark is gone."""
    port, handler = smtp_server
    mail = (
        b"From: a@x.test\r\nTo: b@x.test\r\n\r\n"
        + b"QUJD" * 19
        + b"\r\n" * 1
        + (b"QUJD" * 19 + b"\r\n") * 20_000
    )

    async def whole(*args: object, **kw: object) -> None:
        raise AssertionError("aiosmtplib's DATA path was taken for a ready mail")

    monkeypatch.setattr(smtp, "_execute_data", whole)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=20)
    smtp._READY[id(mail)] = mail  # what SmtpCluster.send(..., ready=True) does for the session
    try:
        async with client:
            await client.sendmail("a@x.test", ["b@x.test"], mail)
    finally:
        smtp._READY.pop(id(mail))
    assert handler.received[0] == mail and not smtp._is_ready(mail)


# ------------------------------------------------------------------------------------------------ poplib


class _Pop3Server:
    """Just enough POP3 (RFC 1939) for one session: greeting, AUTH, RETR with dot-stuffing, QUIT."""

    def __init__(self, mails: dict[int, bytes]) -> None:
        self.mails = mails
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.commands: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rb") as rfile:
            conn.sendall(b"+OK ready\r\n")
            for raw in rfile:
                line = raw.decode().strip()
                self.commands.append(line)
                verb, _, arg = line.partition(" ")
                if verb == "RETR" and int(arg) in self.mails:
                    stuffed = b"\r\n".join(
                        b"." + x if x.startswith(b".") else x for x in self.mails[int(arg)].split(b"\r\n")
                    )
                    conn.sendall(b"+OK follows\r\n" + stuffed + b".\r\n")
                elif verb == "RETR":
                    conn.sendall(b"-ERR no such message\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"+OK bye\r\n")
                    return
                else:
                    conn.sendall(b"+OK\r\n")

    def close(self) -> None:
        self.sock.close()
        self.thread.join(10)


@pytest.mark.asyncio
async def test_our_retr_reader_works_on_poplibs_connection() -> None:
    assert poplib._MAXLINE == 64 * 1024  # type: ignore[attr-defined]  # our setting is still the one poplib reads
    big = b"".join(
        b"%07d ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/\r\n" % i
        for i in range(40_000)
    )
    mails = {
        1: b"Subject: a\r\n\r\n.starts with a dot\r\n..two dots\r\nend\r\n",
        2: b"Subject: b\r\n\r\n" + big,
    }
    server = _Pop3Server(mails)
    try:
        conn = poplib.POP3("127.0.0.1", server.port, timeout=20)
        assert conn._shortcmd("AUTH EXTERNAL =").startswith(b"+OK")  # type: ignore[attr-defined]
        assert conn.sock is not None and conn.file is not None  # what our reader reads from
        session = pop3.Pop3Session(Node("127.0.0.1", server.port), conn)  # type: ignore[arg-type]
        assert bytes(await session.retr(1, size_hint=10)) == mails[1]  # LIST under-reported: the buffer grows
        assert bytes(await session.retr(2, size_hint=len(mails[2]))) == mails[2]
        with pytest.raises(pop3.MailError):
            await session.retr(3)
        with pytest.raises(pop3.MailTooLarge):
            await session.retr(2, size_hint=1000, limit=200_000)
        session.abort()
    finally:
        server.close()
    assert server.commands[:4] == ["AUTH EXTERNAL =", "RETR 1", "RETR 2", "RETR 3"]


def test_retr_undoes_dot_stuffing_however_the_pieces_fall() -> None:
    """RETR's answer is written out as it arrives, piece by piece: a stuffed dot, a CRLF or the terminator split
    between two pieces changes nothing (random mails of dot-heavy lines, random piece sizes)."""
    import io
    import random

    rng = random.Random(3)
    for trial in range(300):
        lines = [
            "".join(rng.choice(".ab") for _ in range(rng.randint(0, 12))).encode()
            for _ in range(rng.randint(0, 50))
        ]
        mail = b"".join(line + b"\r\n" for line in lines)
        wire = (
            b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"
        )
        out = io.BytesIO()
        reader = pop3.DotLines(out, 1 << 20)
        pos, done = 0, False
        while not done:
            assert pos < len(wire), trial
            step = rng.randint(1, 20)
            done = reader.feed(memoryview(wire[pos : pos + step]))
            pos += step
        assert out.getvalue() == mail and reader.written == len(mail), trial
    with pytest.raises(pop3.MailTooLarge):
        pop3.DotLines(io.BytesIO(), 100).feed(b"x" * 200)  # no line end at all: the limit still holds


# ------------------------------------------------------------------------------------------------ aioimaplib


def test_aioimaplib_still_has_what_authenticate_external_uses() -> None:
    params = inspect.signature(aioimaplib.Command).parameters
    assert list(params)[:3] == ["name", "tag", "args"] and "loop" in params
    assert callable(getattr(aioimaplib.IMAP4ClientProtocol, "new_tag", None))
    assert callable(getattr(aioimaplib.IMAP4ClientProtocol, "execute", None))
    assert aioimaplib.AUTH == "AUTH" and "AUTH" in aioimaplib.Commands["SELECT"].valid_states
    assert issubclass(aioimaplib.CommandTimeout, Exception) and issubclass(aioimaplib.Abort, Exception)


# ------------------------------------------------------------------------------------------------ pynetdicom


def test_pynetdicom_still_reads_the_config_switches_we_set() -> None:
    from pynetdicom import _config

    for name in (
        "STORE_SEND_CHUNKED_DATASET",
        "LOG_HANDLER_LEVEL",
        "LOG_REQUEST_IDENTIFIERS",
        "LOG_RESPONSE_IDENTIFIERS",
    ):
        assert hasattr(_config, name), f"pynetdicom._config.{name} is gone"


def test_a_chunked_c_store_from_the_forwarder_reaches_a_pynetdicom_scp(tmp_path: Path) -> None:
    """The forwarder streams the stored file (STORE_SEND_CHUNKED_DATASET): the SCP must get the same dataset."""
    from pydicom import dcmread
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from gateway.config import Pacs
    from gateway.devtools.studies import make_study
    from gateway.stages.forward import send_batch

    [path] = make_study(tmp_path / "s", ct=1, mr=0, sc=0, size=64)
    got: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        got.append(event.request.DataSet.getvalue())
        return 0x0000

    scp_ae = AE(ae_title="CONTRACT")
    scp_ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = scp_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.socket.getsockname()[1]  # type: ignore[union-attr]
        ds = dcmread(path)
        item = {
            "sop_uid": ds.SOPInstanceUID,
            "sop_class_uid": ds.SOPClassUID,
            "transfer_syntax": ds.file_meta.TransferSyntaxUID,
            "path": path.name,
        }
        pacs = Pacs("contract", "127.0.0.1", port, "CONTRACT", "GATEWAY", timeout=20)
        [outcome] = send_batch(pacs, [item], path.parent)
    finally:
        server.shutdown()
    assert outcome.status == 0 and outcome.error is None
    raw = path.read_bytes()
    meta_end = 144 + int.from_bytes(
        raw[140:144], "little"
    )  # preamble, DICM, (0002,0000) and the group it counts
    assert got == [raw[meta_end:]]  # the dataset as stored, byte for byte


def test_a_pacs_rejection_is_reported_with_its_reason(tmp_path: Path) -> None:
    """Judged by the A-ASSOCIATE-RJ PDU (pynetdicom's own flag can miss a quick rejection on a loaded machine)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from gateway.config import Pacs
    from gateway.devtools.studies import make_study
    from gateway.stages.forward import send_batch

    [path] = make_study(tmp_path / "s", ct=1, mr=0, sc=0, size=16)
    scp_ae = AE(ae_title="RIGHT")
    scp_ae.require_called_aet = True
    scp_ae.add_supported_context(CTImageStorage)
    server = scp_ae.start_server(("127.0.0.1", 0), block=False)
    try:
        port = server.socket.getsockname()[1]  # type: ignore[union-attr]
        item = {"sop_uid": "1.2.3", "sop_class_uid": CTImageStorage, "transfer_syntax": "1.2.840.10008.1.2.1"}
        pacs = Pacs("p", "127.0.0.1", port, "WRONG", "GATEWAY", timeout=20)
        [outcome] = send_batch(pacs, [{**item, "path": path.name}], path.parent)
    finally:
        server.shutdown()
    assert outcome.status is None
    assert outcome.error == "association rejected: Called AE title not recognised (permanent)"
