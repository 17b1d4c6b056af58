"""Stage 6, ingest: verify, decrypt and store fetched mails; quarantine what must not be ingested.

A mail is ingested only when it is encrypted to us, signed by the partner whose address sent it (its pinned
certificate from the configuration), and every part is a readable DICOM instance. Otherwise the whole mail goes
to `spool/quarantine/` with a reason file, and its catalog row says why. Nothing of a refused mail is stored.

De-duplication: a set part already ingested is recorded as a duplicate; an instance whose SOP Instance UID is
already stored with the same bytes is not stored twice; same UID with other bytes is kept aside (conflicts/).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from cryptography import x509

from gateway.catalog import Catalog, InstanceRecord
from gateway.config import Settings
from gateway.core.inbound import Refused, Sender, inspect_mail
from gateway.core.smime import Identity
from gateway.core.states import MailState
from gateway.stages import wait_woken
from gateway.storage import Storage, StoreOutcome, fsync_dir, write_durable

log = logging.getLogger(__name__)


class Ingester:
    """Turns inbox mails into stored instances, or quarantines them."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        catalog: Catalog,
        identity: Identity,
        partner_certs: dict[str, x509.Certificate],
        wake: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.catalog = catalog
        self.identity = identity
        self.address_book = {
            p.address.lower(): Sender(p.name, (partner_certs[p.name],)) for p in settings.partners
        }
        self.wake = wake
        self.ingested = 0
        self.quarantined = 0

    async def quarantine(self, mail_id: str, path: Path, reason: str) -> None:
        """Move the mail aside with its reason; record it."""
        target = self.storage.quarantine / path.name
        await asyncio.to_thread(
            write_durable, target.with_suffix(".reason.txt"), [reason.encode() + b"\n"], self.storage.tmp
        )
        if path.exists():
            os.replace(path, target)
            fsync_dir(self.storage.quarantine)
        await self.catalog.finish_in_mail(mail_id, MailState.QUARANTINED, time.time(), error=reason)
        self.quarantined += 1
        log.warning("mail %s quarantined: %s", mail_id, reason)

    async def ingest(self, mail_id: str, path: Path) -> None:
        """Ingest or quarantine one fetched mail."""
        raw = await asyncio.to_thread(path.read_bytes)
        try:
            accepted = await asyncio.to_thread(inspect_mail, raw, self.identity, self.address_book)
        except Refused as exc:
            await self.quarantine(mail_id, path, exc.reason)
            return
        now = time.time()
        if await self.catalog.in_part_done(accepted.transfer_id, accepted.part):
            await self.catalog.finish_in_mail(
                mail_id,
                MailState.DUPLICATE,
                now,
                transfer_id=accepted.transfer_id,
                part=accepted.part,
                total=accepted.total,
            )
            path.unlink(missing_ok=True)
            log.info(
                "mail %s: set %s part %d already ingested (re-delivery)",
                mail_id,
                accepted.transfer_id,
                accepted.part,
            )
            return
        records = []
        size = 0
        for info, data in accepted.parts:
            result = await asyncio.to_thread(self.storage.store_bytes, data, info)
            if result.outcome is StoreOutcome.CONFLICT:
                log.warning(
                    "mail %s: instance %s differs from the stored one; kept aside in conflicts/",
                    mail_id,
                    info.sop_instance_uid,
                )
                continue
            size += result.size
            records.append(
                InstanceRecord(
                    info,
                    self.storage.relative(result.path),
                    result.size,
                    result.sha256,
                    "mail",
                    accepted.partner,
                    None,
                    now,
                    in_transfer=accepted.transfer_id,
                )
            )
        await self.catalog.record_instances(records)
        completed = await self.catalog.finish_in_mail(
            mail_id,
            MailState.INGESTED,
            time.time(),
            transfer_id=accepted.transfer_id,
            partner=accepted.partner,
            study_uid=accepted.study_uid,
            part=accepted.part,
            total=accepted.total,
            instances=len(records),
            size=size,
        )
        # crash before this unlink: the row says ingested, the file is removed at the next start-up
        path.unlink(missing_ok=True)
        self.ingested += 1
        log.info(
            "mail %s: set %s part %d/%d ingested, %d instances",
            mail_id,
            accepted.transfer_id,
            accepted.part,
            accepted.total,
            len(records),
        )
        if completed:
            log.info("transfer %s complete", accepted.transfer_id)

    async def run_forever(self) -> None:
        """Ingest fetched mails as they arrive; never dies."""
        while True:
            try:
                for mail in await self.catalog.pending_in_mails():
                    if not self.storage.has_room():
                        log.warning("D: below its free-space reserve: ingest paused")
                        break
                    try:
                        await self.ingest(str(mail["id"]), self.storage.root / str(mail["path"]))
                    except OSError as exc:
                        if isinstance(exc, FileNotFoundError):
                            await self.catalog.finish_in_mail(
                                str(mail["id"]),
                                MailState.QUARANTINED,
                                time.time(),
                                error="spool file missing",
                            )
                            continue
                        # disk full or an I/O error: the mail stays fetched and is ingested again later
                        log.warning(
                            "mail %s: ingest paused: %s", mail["id"], exc.strerror or type(exc).__name__
                        )
                        break
                    except Exception as exc:
                        log.exception("mail %s: ingest failed", mail["id"])
                        await self.quarantine(
                            str(mail["id"]),
                            self.storage.root / str(mail["path"]),
                            f"internal error: {type(exc).__name__}",
                        )
            except Exception:
                log.exception("ingest loop error; retrying")
            await wait_woken(self.wake, 5)
