"""Stage 7, forward: every instance that arrived by mail goes on to each configured PACS (C-STORE SCU).

Per PACS, due instances are sent on one association, each file streamed as stored (no decode). Success and the
warning statuses (0xB000, 0xB006, 0xB007) count as accepted; a failure status or a failed association is retried
with backoff (`retry_base`·2^n), and after `max_attempts` the instance is recorded as rejected with the PACS's
status: "sent" never hides a failed import. pynetdicom blocks, so each association runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config

from gateway.catalog import Catalog
from gateway.config import Pacs, Settings
from gateway.stages import wait_woken
from gateway.stages.context import Stage, StageContext
from gateway.storage import Storage

log = logging.getLogger(__name__)

ACCEPTED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Outcome:
    """What the PACS answered for one instance (status None: no answer, the association failed)."""

    sop_uid: str
    status: int | None
    error: str | None = None


def send_batch(pacs: Pacs, items: list[dict[str, Any]], root: Path, timeout: float = 60) -> list[Outcome]:
    """One association, every item; blocking (run in a thread)."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the stored file as it is
    ae = AE(ae_title=pacs.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = sorted({(str(i["sop_class_uid"]), str(i["transfer_syntax"])) for i in items})[:128]
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    tls_args = None
    if pacs.tls_ca is not None:
        # DICOM TLS: the PACS must present a certificate from tls_ca for its host name; never a plain fallback
        ctx = ssl.create_default_context(cafile=str(pacs.tls_ca))
        if pacs.tls_cert is not None and pacs.tls_key is not None:
            ctx.load_cert_chain(str(pacs.tls_cert), str(pacs.tls_key))
        tls_args = (ctx, pacs.host)
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted or unreachable"
        return [Outcome(str(i["sop_uid"]), None, f"association {why}") for i in items]
    outcomes = []
    try:
        for i in items:
            if (str(i["sop_class_uid"]), str(i["transfer_syntax"])) not in contexts:
                outcomes.append(
                    Outcome(str(i["sop_uid"]), None, "too many kinds in one association; next round")
                )
                continue
            try:
                rsp = assoc.send_c_store(root / str(i["path"]))
            except (ValueError, OSError, RuntimeError) as exc:
                outcomes.append(Outcome(str(i["sop_uid"]), None, f"{type(exc).__name__}"))
                continue
            status = int(getattr(rsp, "Status", -1)) if rsp else None
            outcomes.append(Outcome(str(i["sop_uid"]), status, None if status is not None else "no response"))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    sent = {o.sop_uid for o in outcomes}
    outcomes += [
        Outcome(str(i["sop_uid"]), None, "association ended") for i in items if str(i["sop_uid"]) not in sent
    ]
    return outcomes


async def purge_accepted(settings: Settings, storage: Storage, catalog: Catalog, now: float) -> int:
    """Free the space of instances every PACS accepted more than `storage.keep_days_after_pacs` days ago."""
    if not settings.pacs or settings.keep_days_after_pacs <= 0:
        return 0
    cutoff = now - settings.keep_days_after_pacs * 86400
    purged = 0
    for sop_uid, path in await catalog.purgeable(len(settings.pacs), cutoff):
        await catalog.mark_purged(sop_uid, now)
        # crash here: the row says purged, the file is still there; storage reconciliation removes it at start-up
        (storage.root / path).unlink(missing_ok=True)
        purged += 1
    if purged:
        log.info("freed the files of %d instances every PACS accepted", purged)
    return purged


class Forwarder(Stage):
    """Forwards inbound instances to the local PACS nodes and records what each accepted."""

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.accepted = 0
        self.rejected = 0

    async def run_once(self, now: float | None = None) -> int:
        try:
            return await self._try_due(now)
        finally:
            self.progress.forwarder.idle()

    async def _try_due(self, now: float | None) -> int:
        """Try every due forward once; return how many were tried."""
        due = await self.catalog.due_forwards(now or time.time())
        self.progress.forwarder.beat(bool(due))
        by_pacs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in due:
            by_pacs[str(row["pacs"])].append(row)
        for name, items in by_pacs.items():
            pacs = next((p for p in self.settings.pacs if p.name == name), None)
            if pacs is None:
                for i in items:
                    await self.catalog.record_forward(
                        str(i["sop_uid"]),
                        name,
                        "rejected",
                        int(i["attempts"]),
                        time.time(),
                        error="PACS no longer configured",
                    )
                continue
            outcomes = await asyncio.to_thread(send_batch, pacs, items, self.storage.root)
            self.progress.forwarder.done()  # accepted, refused or retried later: each is an outcome
            attempts_of = {str(i["sop_uid"]): int(i["attempts"]) + 1 for i in items}
            for o in outcomes:
                attempts = attempts_of[o.sop_uid]
                t = time.time()
                if o.status in ACCEPTED:
                    await self.catalog.record_forward(
                        o.sop_uid, name, "accepted", attempts, t, status=o.status
                    )
                    self.accepted += 1
                    continue
                error = o.error or f"PACS answered 0x{o.status:04X}"
                if attempts >= pacs.max_attempts:
                    await self.catalog.record_forward(
                        o.sop_uid, name, "rejected", attempts, t, status=o.status, error=error
                    )
                    self.rejected += 1
                    log.error(
                        "instance %s: PACS %s refused it %d times (%s): reported",
                        o.sop_uid,
                        name,
                        attempts,
                        error,
                    )
                else:
                    delay = pacs.retry_base * 2 ** (attempts - 1)
                    await self.catalog.record_forward(
                        o.sop_uid,
                        name,
                        "retry",
                        attempts,
                        t,
                        status=o.status,
                        next_attempt=t + delay,
                        error=error,
                    )
            log.info("PACS %s: %d instances tried", name, len(items))
        if due:
            self.wakes.receipts.set()  # receipts wait for the PACS's answers
        return len(due)

    async def run_forever(self) -> None:
        """Forward as instances arrive and retries fall due; never dies."""
        while True:
            try:
                tried = await self.run_once()
            except Exception:
                log.exception("forwarding failed; retrying")
                tried = 0
            if not tried:
                await wait_woken(self.wakes.forwarder, 5)
