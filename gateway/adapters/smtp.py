"""The SMTP edge: hand a prepared mail to one node of the cluster, failing over to the next.

STARTTLS is required (aiosmtplib raises if the server does not offer it: never a plaintext fallback), the
server certificate is verified against the configured CA and the gateway presents its client certificate.
One mapping from SMTP outcomes to our errors (`_classify`): 5xx → `RejectedError` (permanent), everything
else (refused, TLS failure, timeout, 4xx, disconnect) → `MailNodeError` and the next node is tried.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import aiosmtplib
import aiosmtplib.protocol
import aiosmtplib.smtp

from gateway.adapters.failover import first_working
from gateway.config import MailSettings, Node
from gateway.core import mime
from gateway.core.nodepool import NodePool
from gateway.errors import MailNodeError, RejectedError

log = logging.getLogger(__name__)


class WireReady(bytes):
    """A message exactly as it goes after DATA: CRLF line ends only, ends with CRLF, no line starts with '.'."""


wire_ready = mime.wire_ready  # the check lives in the pure core, where mails are built

# Messages being sent that need no rewriting, by id, each held here while its session runs (so its id cannot be
# taken by another object meanwhile): a mail read from the outbox is sent as the bytes read, not copied into a
# WireReady (a 27 MB copy with the interpreter lock held, while the event loop waits).
_READY: dict[int, bytes] = {}


def _is_ready(message: bytes) -> bool:
    return isinstance(message, WireReady) or _READY.get(id(message)) is message


def prepare(data: bytes, known_ready: bool = False) -> bytes:
    """Mark a message that needs no transformation for DATA.

    Every mail the gateway builds qualifies (CRLF throughout, base64 bodies), and the packager says so in the
    queue item (`known_ready`), so the gateway process does not scan it again: four passes over a 27 MB mail
    hold the interpreter lock, and the event loop waits meanwhile. Anything else is scanned, and returned
    unchanged if it does not qualify, for aiosmtplib to transform as usual.
    """
    return WireReady(data) if known_ready or wire_ready(data) else data


# aiosmtplib normalizes line ends (once for the SIZE it announces, once for DATA) and dot-stuffs every message with
# regular expressions over the whole message, inside the event loop: about 0.8 s for a 27 MB mail, during which every
# other stage waits. For a WireReady message
# both are no-ops, so they are skipped; any other message goes through them unchanged. (aiosmtplib is pinned below 6;
# tests/test_units checks these names still exist.)
_normalize = aiosmtplib.protocol.normalize_message_line_endings
_period = aiosmtplib.protocol.PERIOD_REGEX


def _normalize_unless_ready(message: bytes) -> bytes:
    return message if _is_ready(message) else _normalize(message)


class _PeriodUnlessReady:
    def sub(self, repl: bytes, message: bytes) -> bytes:
        return message if _is_ready(message) else _period.sub(repl, message)


aiosmtplib.protocol.normalize_message_line_endings = _normalize_unless_ready
aiosmtplib.smtp.normalize_message_line_endings = _normalize_unless_ready
aiosmtplib.protocol.PERIOD_REGEX = _PeriodUnlessReady()  # type: ignore[assignment]

# aiosmtplib then appends ".\r\n" to the message (a copy of it) and writes it to the TLS transport in one piece,
# which copies the encrypted mail into the transport's buffer: two copies of a 27 MB mail with the interpreter lock
# held, while the gateway's event loop waits for it (py-spy --gil). A WireReady message goes in pieces instead, each
# written when the transport has room (flow control, bounded by the command timeout), then the terminator.
_PIECE = 1 << 18
_execute_data = aiosmtplib.protocol.SMTPProtocol.execute_data_command


async def _execute_data_in_pieces(
    self: aiosmtplib.protocol.SMTPProtocol, message: bytes, timeout: float | None = None
) -> aiosmtplib.SMTPResponse:
    if not _is_ready(message):
        return await _execute_data(self, message, timeout)
    if self._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    async with self._command_lock:
        self._response_pending = True
        self.write(b"DATA\r\n")
        start = await self.read_response(timeout=timeout)
        if start.code != aiosmtplib.SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        self._response_pending = True
        view = memoryview(message)
        for at in range(0, len(view), _PIECE):
            self.write(view[at : at + _PIECE])  # type: ignore[arg-type]
            try:
                await asyncio.wait_for(self._drain_helper(), timeout)
            except ConnectionResetError as exc:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost") from exc
            except TimeoutError as exc:
                raise aiosmtplib.SMTPTimeoutError("Timed out writing the message") from exc
        self.write(b".\r\n")
        response = await self.read_response(timeout=timeout)
        if response.code != aiosmtplib.SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


aiosmtplib.protocol.SMTPProtocol.execute_data_command = _execute_data_in_pieces  # type: ignore[method-assign]


def _classify(node: Node, exc: BaseException) -> MailNodeError | RejectedError:
    if isinstance(exc, aiosmtplib.SMTPResponseException) and 500 <= exc.code < 600:
        # A 5xx at connect/EHLO/STARTTLS is about this node's session, not about the message.
        if isinstance(
            exc, aiosmtplib.SMTPRecipientRefused | aiosmtplib.SMTPDataError | aiosmtplib.SMTPSenderRefused
        ):
            return RejectedError(f"{node}: {exc.code} {exc.message}")
        return MailNodeError(str(node), f"{exc.code} {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [e.code for e in exc.recipients]
        if codes and all(500 <= c < 600 for c in codes):
            return RejectedError(
                f"{node}: recipient refused: {'; '.join(f'{e.code} {e.message}' for e in exc.recipients)}"
            )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return MailNodeError(str(node), f"{exc.code} {exc.message}")
    if isinstance(
        exc,
        ssl.SSLError
        | aiosmtplib.SMTPConnectError
        | aiosmtplib.SMTPConnectTimeoutError
        | aiosmtplib.SMTPTimeoutError,
    ):
        return MailNodeError(str(node), f"{type(exc).__name__}: {exc}")
    return MailNodeError(str(node), f"{type(exc).__name__}: {exc}")


class SmtpCluster:
    """Sends mails through a round-robin pool of SMTP nodes."""

    def __init__(self, mail: MailSettings, tls: ssl.SSLContext) -> None:
        self.mail = mail
        self.tls = tls
        self.pool: NodePool[Node] = NodePool(mail.smtp_nodes, mail.node_cooldown)

    async def _send_via(self, node: Node, sender: str, recipient: str, data: bytes) -> None:
        """One SMTP session, on an event loop of its own in a worker thread.

        asyncio encrypts everything one `write` hands it before it returns, and aiosmtplib writes the whole message
        at once: for a 27 MB mail the gateway's event loop would stand still for a third of a second. OpenSSL lets
        go of the GIL while it encrypts, so in a thread the rest of the gateway keeps running meanwhile.
        """
        await asyncio.to_thread(asyncio.run, self._session(node, sender, recipient, data))

    async def _session(self, node: Node, sender: str, recipient: str, data: bytes) -> None:
        client = aiosmtplib.SMTP(
            hostname=node.host,
            port=node.port,
            start_tls=True,
            tls_context=self.tls,
            timeout=self.mail.io_timeout,
            local_hostname=sender.split("@", 1)[1],
        )
        await client.connect(timeout=self.mail.connect_timeout)
        try:
            errors, _ = await client.sendmail(sender, [recipient], data, timeout=self.mail.io_timeout)
            if errors:
                raise aiosmtplib.SMTPRecipientsRefused(
                    [aiosmtplib.SMTPRecipientRefused(code, msg, rcpt) for rcpt, (code, msg) in errors.items()]
                )
        finally:
            try:
                await client.quit()
            except Exception:
                client.close()

    async def _probe_session(self, node: Node, local_hostname: str) -> None:
        client = aiosmtplib.SMTP(
            hostname=node.host,
            port=node.port,
            start_tls=True,
            tls_context=self.tls,
            timeout=self.mail.io_timeout,
            local_hostname=local_hostname,
        )
        await client.connect(
            timeout=self.mail.connect_timeout
        )  # greeting, EHLO, STARTTLS with our certificate
        try:
            await client.noop()
        finally:
            try:
                await client.quit()
            except Exception:
                client.close()

    async def probe_failing(self, local_hostname: str) -> int:
        """Probe every node that failed last and has rested (connect, STARTTLS with the client certificate, NOOP,
        QUIT; no mail): a node that came back is OK again without waiting for traffic. Returns the nodes probed."""
        nodes = self.pool.to_probe(time.time())
        for node in nodes:
            try:
                await asyncio.to_thread(asyncio.run, self._probe_session(node, local_hostname))
            except Exception as exc:
                err = _classify(node, exc)
                problem = err.problem if isinstance(err, MailNodeError) else str(err)
                self.pool.failed(node, time.time(), f"probe: {problem}")
                continue
            self.pool.ok(node, time.time())
            log.info("SMTP node %s answers again (probe)", node)
        return len(nodes)

    async def send(self, sender: str, recipient: str, data: bytes, ready: bool = False) -> Node:
        """Deliver to the first node that takes it; return that node. Raises RejectedError or TransientError.
        `ready`: the message is known to go after DATA as it is (`wire_ready`; the packager checked it)."""

        async def via(node: Node) -> None:
            await self._send_via(node, sender, recipient, data)

        if ready:
            _READY[id(data)] = data
        try:
            node, _ = await first_working(self.pool, "SMTP", via, (Exception,), _classify)
        finally:
            if ready:
                _READY.pop(id(data), None)
        return node  # all failed: see stages/send.ALL_NODES_FAILED
