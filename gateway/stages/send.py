"""Stage 4, send: queued mails go to the SMTP cluster; "sent" is recorded only after the server's 250.

Transient failures (every node refused, timed out, 4xx) defer the mail with exponential backoff; a 5xx, or a
mail still undeliverable after `retry_max_age`, fails the transfer with the server's reply.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.adapters.smtp import SmtpCluster
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.core.states import retry_delay
from gateway.errors import RejectedError, TransientError
from gateway.stages import wait_woken
from gateway.storage import Storage

log = logging.getLogger(__name__)


class Sender:
    """Delivers queued outbound mails."""

    def __init__(
        self, settings: Settings, storage: Storage, catalog: Catalog, smtp: SmtpCluster, wake: asyncio.Event
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.catalog = catalog
        self.smtp = smtp
        self.wake = wake
        self.sent = 0

    async def send_one(self, mail: dict[str, object]) -> None:
        """Try one mail once and record the outcome."""
        mail_id = str(mail["id"])
        partner = self.settings.partner_by_name(str(mail["partner"]))
        path = self.storage.root / str(mail["path"])
        now = time.time()
        if partner is None:
            await self.catalog.fail_mail(mail_id, f"partner {mail['partner']} no longer configured", now)
            return
        data = await asyncio.to_thread(path.read_bytes)
        attempts = int(str(mail["attempts"])) + 1
        try:
            node = await self.smtp.send(self.settings.mail.address, partner.address, data)
        except RejectedError as exc:
            log.error(
                "mail %s part %s/%s rejected: %s", mail["transfer_id"], mail["part"], mail["total"], exc
            )
            await self.catalog.fail_mail(mail_id, f"rejected: {exc}", time.time())
            return
        except TransientError as exc:
            now = time.time()
            if now - float(str(mail["created_at"])) > self.settings.retry_max_age:
                await self.catalog.fail_mail(mail_id, f"gave up after {attempts} attempts: {exc}", now)
                return
            delay = retry_delay(attempts, self.settings.mail.retry_base, self.settings.mail.retry_cap)
            log.warning("mail %s part %s deferred %.0f s: %s", mail["transfer_id"], mail["part"], delay, exc)
            await self.catalog.defer_mail(mail_id, attempts, now + delay, str(exc), now)
            return
        # crash here: the server has the mail but the catalog does not know; it is sent again after restart and
        # the receiver drops the duplicate (same set id and part). At-least-once on the wire, exactly-once in storage.
        done = await self.catalog.mark_mail_sent(mail_id, str(node), time.time())
        path.unlink(missing_ok=True)
        self.sent += 1
        if done:
            log.info("transfer %s sent: all %s mails accepted", mail["transfer_id"], mail["total"])

    async def run_forever(self) -> None:
        """Send due mails; sleep until woken or the next retry is due; never dies."""
        while True:
            try:
                for mail in await self.catalog.due_out_mails(time.time()):
                    await self.send_one(mail)
                nxt = await self.catalog.next_out_attempt()
            except Exception:
                log.exception("sender loop error; retrying")
                nxt = time.time() + 5
            timeout = 30.0 if nxt is None else max(0.05, min(30.0, nxt - time.time()))
            if await self.catalog.due_out_mails(time.time(), limit=1):
                continue
            await wait_woken(self.wake, timeout)
