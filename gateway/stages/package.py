"""Stage 3, package: a pending transfer becomes signed, encrypted mails in the outbox queue.

The split plan comes from the pure core (`mailformat.plan_mails`); each mail is built (in a worker thread:
signing and encryption are CPU work) into `spool/outbox-staging/<transfer>/`. When the whole set is built, the
catalog records it (transfer → packaged) and the parts move into the outbox's INCOMING state. A crash before the
catalog commit rebuilds the set; a crash after it finishes the move at start-up (`release_staged`).
Memory holds one mail at a time, whatever the size of the study.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from cryptography import x509

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.core import mailformat
from gateway.core.smime import Identity
from gateway.core.states import TransferState
from gateway.spool import Spool
from gateway.stages import wait_woken
from gateway.storage import Storage

log = logging.getLogger(__name__)


def item_id(transfer_id: str, part: int) -> str:
    """The outbox queue item of one mail."""
    return f"{transfer_id}.{part:05d}"


def message_id(transfer_id: str, part: int, sender: str) -> str:
    """Stable per transfer and part, so a re-sent mail is recognisable as the same one."""
    return f"<{transfer_id}.{part}@{sender.split('@', 1)[1]}>"


class Packager:
    """Builds the mails of pending transfers."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        catalog: Catalog,
        identity: Identity,
        partner_certs: dict[str, x509.Certificate],
        wake: asyncio.Event,
        wake_sender: asyncio.Event,
        outbox: Spool,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self.storage = storage
        self.catalog = catalog
        self.identity = identity
        self.partner_certs = partner_certs
        self.wake = wake
        self.wake_sender = wake_sender

    def _build_one(
        self,
        header: mailformat.MailHeader,
        paths: list[Path],
        recipient: x509.Certificate,
        folder: Path,
        meta: dict[str, object],
    ) -> int:
        parts = [p.read_bytes() for p in paths]
        data = mailformat.build_mail(header, parts, self.identity, recipient)
        if len(data) > self.settings.mail.max_mail_size:
            raise mailformat.MailFormatError(f"built mail has {len(data)} bytes, above max_mail_size")
        # crash after this write: the transfer is still pending; packaging starts over and rebuilds the folder
        Spool.prepare_item(folder, item_id(header.set_id, header.part), data, meta)
        return len(data)

    async def package(self, transfer: dict[str, object]) -> None:
        """Build and record all mails of one transfer (or fail it with the reason)."""
        tid = str(transfer["id"])
        partner = self.settings.partner_by_name(str(transfer["partner"]))
        now = time.time()
        if partner is None:
            await self.catalog.set_transfer_state(
                tid, TransferState.FAILED, now, f"partner {transfer['partner']} no longer configured"
            )
            return
        instances = await self.catalog.transfer_instances(tid)
        if not instances:
            await self.catalog.set_transfer_state(tid, TransferState.FAILED, now, "transfer has no instances")
            return
        try:
            plan = mailformat.plan_mails([size for _, _, size in instances], self.settings.mail.max_mail_size)
        except mailformat.MailFormatError as exc:
            log.error("transfer %s failed: %s", tid, exc)
            await self.catalog.set_transfer_state(tid, TransferState.FAILED, now, str(exc))
            return
        folder = self.storage.outbox_staging / tid
        if folder.exists():
            shutil.rmtree(folder)  # a half-built set from before a crash
        total = len(plan)
        built: list[tuple[str, int, int, str, int]] = []
        for part, indexes in enumerate(plan, start=1):
            header = mailformat.MailHeader(
                sender=self.settings.mail.address,
                recipient=partner.address,
                subject=self.settings.mail.subject,
                message_id=message_id(tid, part, self.settings.mail.address),
                set_id=tid,
                part=part,
                total=total,
                study_uid=str(transfer.get("study_uid") or ""),
                date=time.time(),
            )
            paths = [self.storage.root / instances[i][1] for i in indexes]
            meta: dict[str, object] = {
                "transfer": tid,
                "part": part,
                "total": total,
                "partner": partner.name,
                "message_id": header.message_id,
                "attempts": 0,
            }
            size = await asyncio.to_thread(
                self._build_one, header, paths, self.partner_certs[partner.name], folder, meta
            )
            built.append((header.message_id, part, total, f"spool/outbox/{item_id(tid, part)}", size))
        await self.catalog.add_out_mails(tid, built, time.time())
        # crash here: the set is recorded but still staged; start-up moves it into the outbox (release_staged)
        await asyncio.to_thread(self.release, tid)
        # from here the mails are queued: the sender owns them
        log.info(
            "transfer %s: %d instances packaged into %d mails for %s",
            tid,
            len(instances),
            total,
            partner.name,
        )
        self.wake_sender.set()

    def release(self, tid: str) -> None:
        """Move a completely built and recorded set from staging into the outbox queue."""
        folder = self.storage.outbox_staging / tid
        if not folder.exists():
            return
        for item_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            self.outbox.adopt(item_dir)
        shutil.rmtree(folder, ignore_errors=True)

    async def release_staged(self) -> int:
        """Start-up: finish sets that were recorded but not yet moved; drop sets that were never recorded."""
        released = 0
        for folder in sorted(p for p in self.storage.outbox_staging.iterdir() if p.is_dir()):
            transfer = await self.catalog.transfer(folder.name)
            if transfer is not None and transfer["state"] != TransferState.PENDING.value:
                await asyncio.to_thread(self.release, folder.name)
                released += 1
            else:
                shutil.rmtree(folder, ignore_errors=True)
        return released

    async def run_forever(self) -> None:
        """Package pending transfers as they appear; never dies."""
        while True:
            try:
                for transfer in await self.catalog.transfers_in_state("out", TransferState.PENDING):
                    try:
                        await self.package(transfer)
                    except OSError as exc:
                        if isinstance(exc, FileNotFoundError):
                            await self.catalog.set_transfer_state(
                                str(transfer["id"]),
                                TransferState.FAILED,
                                time.time(),
                                "an instance file is missing from storage",
                            )
                            continue
                        # disk full or an I/O error: the transfer stays pending and is packaged again later
                        log.warning(
                            "transfer %s: packaging paused: %s",
                            transfer["id"],
                            exc.strerror or type(exc).__name__,
                        )
                        break
                    except Exception as exc:
                        log.exception("transfer %s: packaging failed", transfer["id"])
                        await self.catalog.set_transfer_state(
                            str(transfer["id"]),
                            TransferState.FAILED,
                            time.time(),
                            f"packaging failed: {type(exc).__name__}: {exc}",
                        )
            except Exception:
                log.exception("packager loop error; retrying")
            await wait_woken(self.wake, 5)
