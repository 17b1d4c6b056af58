"""In-process mail peers for the fast tier: an SMTP node (aiosmtpd, STARTTLS required) and a POP3S node that log
in by client certificate, sharing one set of mailboxes. No root, no Postfix, no Dovecot: they start in milliseconds.

They speak the same protocols, with the same TLS, as the real cluster (`gateway.devtools.mailcluster`): the
gateway's own adapters (`adapters.smtp`, `adapters.pop3`) talk to them unchanged. What they do not imitate is the
real servers' queueing, quotas and failure modes; the real-peer tier keeps testing those.

- SMTP: `STARTTLS` is required before `MAIL`; a client certificate is checked against the dev CA when one is
  presented. Each message goes into the mailbox of every recipient (address extensions `+x` dropped, as Postfix's
  `recipient_delimiter` does), with a `Return-Path` line in front, as a delivery agent writes it.
- POP3S (RFC 1939 over implicit TLS): the client certificate is required and `AUTH EXTERNAL` logs into the mailbox
  named by its CN (as Dovecot's `ssl_cert_username_field = commonName`). `UIDL`, `LIST`, `STAT`, `RETR` (dot-
  stuffed), `TOP n 0`, `DELE`, `RSET`, `NOOP`, `QUIT` (commits deletions; a dropped connection deletes nothing).
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SmtpServer

from tests.ports import free_port


def _mailbox_of(address: str) -> str:
    local, _, domain = address.lower().partition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


@dataclass
class Mailboxes:
    """What the fake nodes deliver into and serve from: address → [(uid, message bytes)]."""

    boxes: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0

    def deliver(self, address: str, message: bytes) -> None:
        with self.lock:
            self.counter += 1
            self.boxes.setdefault(_mailbox_of(address), []).append((f"fake{self.counter:08d}", message))

    def snapshot(self, address: str) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.boxes.get(_mailbox_of(address), []))

    def remove(self, address: str, uids: set[str]) -> None:
        with self.lock:
            box = self.boxes.get(_mailbox_of(address), [])
            box[:] = [(u, m) for u, m in box if u not in uids]

    def count(self, address: str) -> int:
        return len(self.snapshot(address))


class _Deliver:
    def __init__(self, boxes: Mailboxes) -> None:
        self.boxes = boxes
        self.accepted = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data = envelope.original_content
        if not isinstance(data, bytes):
            return "554 no content"
        stamped = f"Return-Path: <{envelope.mail_from}>\r\n".encode() + data
        for rcpt in envelope.rcpt_tos:
            self.boxes.deliver(rcpt, stamped)
        self.accepted += 1
        return "250 2.0.0 Ok: queued"


def _server_context(pki_dir: Path, require_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki_dir / "mail-server.pem"), str(pki_dir / "mail-server.key"))
    ctx.load_verify_locations(str(pki_dir / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    return ctx


class _StartTlsController(Controller):
    def factory(self) -> SmtpServer:
        return SmtpServer(
            self.handler,
            tls_context=self.tls,
            require_starttls=True,
            hostname="mail.dicommail.test",
            data_size_limit=0,
        )


class FakeSmtp:
    """One SMTP node on 127.0.0.1, STARTTLS required."""

    def __init__(self, boxes: Mailboxes, pki_dir: Path) -> None:
        self.port = free_port()
        self.handler = _Deliver(boxes)
        self.controller = _StartTlsController(self.handler, hostname="127.0.0.1", port=self.port)
        self.controller.tls = _server_context(pki_dir, require_client=False)  # type: ignore[attr-defined]

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        if self.controller.server is not None:  # already stopped by a test: the fixture stops it again
            self.controller.stop()


class FakePop3:
    """One POP3S node on 127.0.0.1: implicit TLS, client certificate required, AUTH EXTERNAL by its CN."""

    def __init__(self, boxes: Mailboxes, pki_dir: Path) -> None:
        self.boxes = boxes
        self.tls = _server_context(pki_dir, require_client=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.sessions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="fake-pop3", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            conn = self.tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.sessions += 1
        with conn, conn.makefile("rb") as rfile:
            user, box, deleted = "", [], set()

            def send(text: str | bytes) -> None:
                conn.sendall(text if isinstance(text, bytes) else text.encode())

            send("+OK fake POP3 ready\r\n")
            for line in rfile:
                verb, _, arg = line.decode("ascii", "replace").strip().partition(" ")
                verb = verb.upper()
                if verb == "AUTH" and arg.upper().startswith("EXTERNAL"):
                    subject = dict(x[0] for x in conn.getpeercert()["subject"])  # type: ignore[index]
                    user = str(subject.get("commonName", ""))
                    box = self.boxes.snapshot(user)
                    send("+OK logged in\r\n")
                elif not user and verb != "QUIT":
                    send("-ERR log in first\r\n")
                elif verb in ("UIDL", "LIST"):
                    listed = [
                        f"{n} {uid if verb == 'UIDL' else len(m)}"
                        for n, (uid, m) in enumerate(box, 1)
                        if uid not in deleted
                    ]
                    send("+OK\r\n" + "".join(x + "\r\n" for x in listed) + ".\r\n")
                elif verb == "STAT":
                    live = [m for uid, m in box if uid not in deleted]
                    send(f"+OK {len(live)} {sum(map(len, live))}\r\n")
                elif verb in ("RETR", "TOP"):
                    number = int(arg.split()[0]) if arg.split() and arg.split()[0].isdigit() else 0
                    if not 1 <= number <= len(box) or box[number - 1][0] in deleted:
                        send("-ERR no such message\r\n")
                        continue
                    message = box[number - 1][1]
                    if verb == "TOP":
                        message = message[: message.find(b"\r\n\r\n") + 4]
                    lines = message.split(b"\r\n")
                    if lines and lines[-1] == b"":
                        lines.pop()
                    body = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
                    send(b"+OK\r\n" + body + b".\r\n")
                elif verb == "DELE":
                    number = int(arg) if arg.isdigit() else 0
                    if 1 <= number <= len(box):
                        deleted.add(box[number - 1][0])
                        send("+OK deleted\r\n")
                    else:
                        send("-ERR no such message\r\n")
                elif verb == "RSET":
                    deleted.clear()
                    send("+OK\r\n")
                elif verb == "NOOP":
                    send("+OK\r\n")
                elif verb == "QUIT":
                    if user:
                        self.boxes.remove(user, deleted)
                    send("+OK bye\r\n")
                    return
                else:
                    send("-ERR unknown command\r\n")


@dataclass
class FakeMail:
    """The fast tier's mail cluster: one SMTP and one POP3S node over shared mailboxes."""

    boxes: Mailboxes
    smtp: FakeSmtp
    pop3: FakePop3

    @property
    def smtp_nodes(self) -> list[str]:
        return [f"127.0.0.1:{self.smtp.port}"]

    @property
    def pop3_nodes(self) -> list[str]:
        return [f"127.0.0.1:{self.pop3.port}"]


def running(pki_dir: Path) -> Iterator[FakeMail]:
    boxes = Mailboxes()
    smtp, pop3 = FakeSmtp(boxes, pki_dir), FakePop3(boxes, pki_dir)
    smtp.start()
    pop3.start()
    try:
        yield FakeMail(boxes, smtp, pop3)
    finally:
        smtp.stop()
        pop3.stop()
