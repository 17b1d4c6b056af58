"""Stage 4, send: outbox items go to the SMTP cluster; "sent" is recorded only after the server's 250.

Each item is claimed (incoming/deferred → active), sent, and moved on: done after 250; deferred with exponential
backoff after a transient failure (every node refused, timed out, 4xx); hold after a 5xx or when still
undeliverable after `retry_max_age` (its transfer fails with the server's reply); corrupt after an unexpected
error, with the traceback. The disk move comes first, then the catalog, which is retried until it answers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback

from gateway.adapters import smtp as smtp_adapter
from gateway.adapters.smtp import SmtpCluster
from gateway.cluster import SEND
from gateway.core.queue import QueueState
from gateway.core.states import retry_delay
from gateway.errors import RejectedError, TransientError
from gateway.metrics import TRANSFER_LATENCY
from gateway.spool import Item
from gateway.stages import Kind, is_receipt, kind_of, record, wait_woken
from gateway.stages.context import Stage, StageContext

log = logging.getLogger(__name__)

ALL_NODES_FAILED = "all SMTP nodes failed"


class Sender(Stage):
    """Delivers queued outbound mails."""

    def __init__(self, ctx: StageContext, smtp: SmtpCluster) -> None:
        super().__init__(ctx)
        self.smtp = smtp
        self.sent = 0
        self.deferred = 0
        self.rejected = 0
        self.bytes_sent = 0
        self.sent_by_node: dict[tuple[str, str], int] = {}  # (node, kind: study/receipt) → mails
        self.bytes_by_node: dict[tuple[str, str], int] = {}  # (node, kind) → bytes on the wire

    async def _hold(self, item: Item, reason: str) -> None:
        await asyncio.to_thread(self.outbox.move, item, QueueState.HOLD, reason=reason)
        if is_receipt(item.meta):
            await record(
                "fail", lambda: self.catalog.set_receipt_out(str(item.meta["receipt"]), "failed", time.time())
            )
            return
        await record("fail", lambda: self.catalog.fail_mail(item.meta["message_id"], reason, time.time()))

    async def send_one(self, item: Item) -> None:
        """Try one mail once and record the outcome.

        Size: one mail's send with every outcome (sent, deferred, rejected) recorded where it happens.
        """
        meta = item.meta
        attempts = int(meta.get("attempts", 0)) + 1
        # crash while active: start-up puts the item back (it may be sent twice; the receiver drops the copy)
        item = await asyncio.to_thread(self.outbox.move, item, QueueState.ACTIVE, attempts=attempts)
        partner = self.settings.partner_by_name(str(meta.get("partner")))
        if partner is None:
            await self._hold(item, f"partner {meta.get('partner')} no longer configured")
            return
        data = await asyncio.to_thread(item.content.read_bytes)
        # checked when the mail was built; anything else (a mail queued by an older version) is checked here
        ready = bool(meta.get("wire_ready")) or await asyncio.to_thread(smtp_adapter.wire_ready, data)
        receipt = is_receipt(meta)
        try:
            node = await self.smtp.send(
                self.settings.mail.address, str(meta.get("to") or partner.address), data, ready
            )
        except RejectedError as exc:
            log.error("mail %s rejected: %s", item.id, exc)
            self.rejected += 1
            await self._hold(item, f"rejected: {exc}")
            return
        except TransientError as exc:
            now = time.time()
            if now - float(meta.get("created", now)) > self.settings.retry_max_age:
                await self._hold(item, f"gave up after {attempts} attempts: {exc}")
                return
            delay = retry_delay(attempts, self.settings.mail.retry_base, self.settings.mail.retry_cap)
            error = str(exc)
            self.deferred += 1
            log.warning("mail %s deferred %.0f s: %s", item.id, delay, error)
            await asyncio.to_thread(
                self.outbox.move, item, QueueState.DEFERRED, next_attempt=now + delay, last_error=error[:1000]
            )
            if receipt:
                return
            await record(
                "defer",
                lambda: self.catalog.defer_mail(
                    meta["message_id"], attempts, now + delay, error, time.time()
                ),
            )
            return
        # before the item is done: a crash sends (and audits) again
        if receipt and self.ctx.audit is not None:
            outcome, sops = await self.catalog.receipt_out_of(str(meta["receipt"]))
            rows = await self.catalog.audit_rows(sops)
            await self.ctx.audit.receipt(True, partner.name, str(meta["receipt"]), outcome, rows)
        # crash here: the server has the mail, the item is still active: it is sent again after restart and the
        # receiver drops the duplicate (same set id and part). At-least-once on the wire, exactly-once in storage.
        await asyncio.to_thread(self.outbox.move, item, QueueState.DONE, drop_content=True, node=str(node))
        key = (str(node), "receipt" if receipt else "study")
        self.sent_by_node[key] = self.sent_by_node.get(key, 0) + 1
        self.bytes_by_node[key] = self.bytes_by_node.get(key, 0) + len(data)
        self.bytes_sent += len(data)
        if receipt:
            await record(
                "sent", lambda: self.catalog.set_receipt_out(str(meta["receipt"]), "sent", time.time())
            )
            log.info("receipt for partner %s accepted by %s", partner.name, node)
            return
        complete = await record(
            "sent", lambda: self.catalog.mark_mail_sent(meta["message_id"], str(node), time.time())
        )
        self.sent += 1
        if complete and self.ctx.audit is not None:
            tid = str(meta.get("transfer"))
            rows = await self.catalog.transfer_audit_rows(tid)
            await self.ctx.audit.sent_to_partner(tid, partner.name, rows)
        # the cluster answers again: mails deferred because every node failed need not wait out their backoff
        await asyncio.to_thread(self._wake_deferred)
        if int(meta.get("part", 0)) == int(meta.get("total", -1)):
            TRANSFER_LATENCY.observe(time.time() - float(meta.get("created", time.time())))
            log.info(
                "transfer %s: last mail (%s of %s) accepted by %s",
                meta.get("transfer"),
                meta.get("part"),
                meta.get("total"),
                node,
            )

    def _wake_deferred(self) -> None:
        for waiting in self.outbox.items(QueueState.DEFERRED):
            if str(waiting.meta.get("last_error", "")).startswith(ALL_NODES_FAILED):
                self.outbox.update(waiting, next_attempt=0)

    async def run_once(self) -> int:
        """Send every mail that is due now (each sent, deferred or set aside); return how many were tried."""
        due = await asyncio.to_thread(self.outbox.due, time.time())
        self.progress.sender.beat(bool(due))
        for listed in due:
            self.progress.sender.done()  # the one before, whatever came of it
            claimed = await self.claims.take_item(self.outbox, SEND, listed)
            if claimed is None:
                continue  # another cluster node sends it
            try:
                await self._send_claimed(claimed)
            finally:
                await self.claims.release(SEND, claimed.id)
        self.progress.sender.idle()
        return len(due)

    async def _send_claimed(self, item: Item) -> None:
        """`send_one`; what goes wrong unexpectedly sets the mail aside, except the catalog being away for a
        moment (a Galera member restarting, a lost connection): then the mail waits and is sent later."""
        try:
            await self.send_one(item)
        except Exception as exc:
            if not self.claims.mine(SEND, item.id):
                log.warning(
                    "mail %s: this node's claim lapsed while sending it; left to the node that took it",
                    item.id,
                )
                return
            current = self.outbox.find(item.id)
            active = current is not None and current.state is QueueState.ACTIVE
            if kind_of(exc) is Kind.TRANSIENT and not isinstance(exc, OSError):
                log.warning("mail %s: catalog unavailable (%s); deferred", item.id, type(exc).__name__)
                if current is not None and active:
                    self.outbox.move(
                        current, QueueState.DEFERRED, next_attempt=time.time() + 10, last_error="catalog away"
                    )
                return
            log.exception("mail %s: unexpected error; set aside as corrupt", item.id)
            if current is None or not active:
                return
            self.outbox.move(
                current,
                QueueState.CORRUPT,
                reason=f"internal error: {type(exc).__name__}",
                traceback=traceback.format_exc()[-4000:],
            )
            if is_receipt(item.meta):
                action = functools.partial(
                    self.catalog.set_receipt_out, str(item.meta.get("receipt")), "failed", time.time()
                )
            else:
                action = functools.partial(
                    self.catalog.fail_mail,
                    str(item.meta.get("message_id")),
                    f"internal error: {type(exc).__name__}",
                    time.time(),
                )
            await record("fail", action)

    async def run_forever(self) -> None:
        """Send due mails; sleep until woken or the next retry is due; never dies."""
        while True:
            try:
                await self.run_once()
                nxt = self.outbox.next_due()
                self.guard.ok()
            except Exception as exc:
                delay = self.guard.failed(exc)
                if delay is None:
                    return
                nxt = time.time() + delay
            if self.outbox.due(time.time(), limit=1):
                continue
            timeout = 30.0 if nxt is None else max(0.05, min(30.0, nxt - time.time()))
            await wait_woken(self.wakes.sender, timeout)
