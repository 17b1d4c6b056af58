"""Stage 3, package: a pending transfer becomes signed, encrypted mails in the outbox queue.

Per partner (address book): the format (`smime`: PS3.15 S/MIME with application/dicom parts; `smime-zip`: the
same around one DICOM.ZIP; `pgp`: @GIT PGP/MIME), the compression (`jpeg2000-lossless` / `deflate`, done in worker
processes on every core before planning, so the plan sees the real sizes) and the split (`sets`: self-contained
mails below the partner's size limit; `partial`: one large mail per `max_message_size`, cut into RFC 2046
message/partial fragments). The split plan comes from the pure core (`mailformat.plan_mails`); each mail is built
(in a worker thread: signing and encryption are CPU work) into `spool/outbox-staging/<transfer>/`. When the whole set is built, the
catalog records it (transfer → packaged) and the parts move into the outbox's INCOMING state. A crash before the
catalog commit rebuilds the set; a crash after it finishes the move at start-up (`release_staged`).
Memory holds one mail at a time, whatever the size of the study.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from gateway import formats
from gateway.cluster import PACKAGE
from gateway.config import Partner
from gateway.core import compress, deid, mailformat
from gateway.core.states import TransferState
from gateway.spool import Spool
from gateway.stages import TRANSIENT_ERRORS, wait_woken
from gateway.stages.context import Stage, StageContext
from gateway.stages.workers import WORKERS, BuildJob, Built, TooLarge, build_mail, start_worker

log = logging.getLogger(__name__)


def message_id(transfer_id: str, part: int, sender: str) -> str:
    """Stable per transfer and part, so a re-sent mail is recognisable as the same one."""
    return f"<{transfer_id}.{part}@{sender.split('@', 1)[1]}>"


class Packager(Stage):
    """Builds the mails of pending transfers, in each partner's format."""

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self._pool: ProcessPoolExecutor | None = None

    # ----------------------------------------------------------------------------- compression
    def pool(self) -> ProcessPoolExecutor:
        """Worker processes for compression and S/MIME building (both cores; the event loop never waits on them)."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=WORKERS,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=start_worker,
                initargs=(os.getpid(),),
            )
        return self._pool

    async def warm(self) -> None:
        """Start the worker processes now (imports, OpenSSL), so the first study does not wait for them."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool(), os.getpid) for _ in range(WORKERS)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _compress(self, partner: Partner, paths: list[Path], work: Path) -> list[Path]:
        """Each instance compressed for this partner (into `work`), or the stored file when it passes unchanged."""
        if (
            partner.compression == "none"
            or partner.compression in formats.get(partner.format).own_compression
        ):
            return paths  # e.g. smime-zip + deflate: the archive itself is deflated
        work.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(
                self.pool(), compress.transcode_file, str(p), str(work / f"{i:06d}.dcm"), partner.compression
            )
            for i, p in enumerate(paths)
        ]
        try:
            results = await asyncio.gather(*futures)
        except BrokenProcessPool:
            # a codec worker died (a crash in OpenJPEG, the OOM killer): compression only saves bytes, the study
            # must still arrive, so this transfer goes uncompressed and the next one gets fresh workers
            log.warning("compression workers failed; this transfer goes uncompressed")
            self.close()
            return paths
        return [
            work / f"{i:06d}.dcm" if r[2] else p for i, (p, r) in enumerate(zip(paths, results, strict=True))
        ]

    async def _deidentify(
        self,
        tid: str,
        transfer: dict[str, object],
        partner: Partner,
        paths: list[Path],
        sops: list[str],
        work: Path,
    ) -> tuple[list[Path], list[str], dict[str, object]]:
        """The transfer's instances de-identified for the partner (`gateway.core.deid`, in the worker processes):
        their files, their SOP Instance UIDs as the partner sees them (receipts name those), and the transfer with
        the study UID the mails carry. The replacements are recorded first, so a result that comes back can be
        matched to the original however far this gets."""
        assert partner.deidentify is not None
        key = await self.catalog.deid_key()
        study = str(transfer.get("study_uid") or "")
        series = {i.sop_uid: i.series_uid for i in await self.catalog.routable(study, unrouted_only=False)}
        pairs = [("study", study, deid.uid_for(key, partner.name, study))]
        pairs += [("series", s, deid.uid_for(key, partner.name, s)) for s in sorted(set(series.values()))]
        pairs += [("sop", sop, deid.uid_for(key, partner.name, sop)) for sop in sops]
        await self.catalog.record_deid_map(partner.name, study, pairs, time.time())
        work.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        options = tuple(sorted(partner.deidentify.options))
        out = [work / f"deid-{i:06d}.dcm" for i in range(len(paths))]
        await asyncio.gather(
            *(
                loop.run_in_executor(
                    self.pool(), deid.deidentify_file, str(p), str(o), key.hex(), partner.name, options
                )
                for p, o in zip(paths, out, strict=True)
            )
        )
        log.info("transfer %s: %d instances de-identified for %s", tid, len(out), partner.name)
        deid_sops = [deid.uid_for(key, partner.name, sop) for sop in sops]
        return out, deid_sops, {**transfer, "study_uid": deid.uid_for(key, partner.name, study)}

    # ----------------------------------------------------------------------------- building
    def _job(
        self,
        header: mailformat.MailHeader,
        partner: Partner,
        paths: list[Path],
        folder: Path,
        meta: dict[str, Any],
        sops: list[str],
    ) -> BuildJob:
        entry = self.keys.book[partner.name]
        recipient = entry.smime
        return BuildJob(
            header=header,
            partner=partner,
            paths=tuple(paths),
            folder=folder,
            meta=meta,
            limit=self.settings.mail_size_for(partner),
            signer=(self.settings.smime_cert, self.settings.smime_key),
            recipient_pem=recipient.public_bytes(serialization.Encoding.PEM)
            if recipient is not None
            else None,
            pgp_fingerprint=entry.pgp_fingerprint,
            sops=tuple(sops),
        )

    async def _build(self, job: BuildJob) -> Built:
        """Build one mail: in a worker process (both cores: base64, hashing and AES hold the GIL), or in a thread for
        a format that is not `in_worker` (OpenPGP: GnuPG is a process of its own anyway)."""
        if not formats.get(job.partner.format).in_worker:
            return await asyncio.to_thread(build_mail, job, self.keys.pgp)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool(), build_mail, job)
        except BrokenProcessPool:
            log.warning("packaging workers failed; building in the gateway process")
            self.close()
            return await asyncio.to_thread(build_mail, job)

    def _plan(self, partner: Partner, sizes: list[int], factor: float) -> list[list[int]]:
        if partner.split == "partial":
            # one large mail per plan entry, cut into fragments; an instance larger than that gets its own mail
            cap = max(partner.max_message_size, self.settings.mail_size_for(partner))
            plan: list[list[int]] = []
            current: list[int] = []
            total = 0
            for i, size in enumerate(sizes):
                if current and total + size > cap * factor:
                    plan.append(current)
                    current, total = [], 0
                current.append(i)
                total += size
            return [*plan, current] if current else plan
        grow = formats.get(partner.format).growth  # beyond S/MIME's own overhead, which the planner knows
        limit = int(self.settings.mail_size_for(partner) * factor)
        return mailformat.plan_mails([int(n * grow) + 1024 for n in sizes], limit)

    async def package(self, transfer: dict[str, object]) -> None:
        """Build and record all mails of one transfer (or fail it with the reason).

        Size: one transfer's whole path (compress, plan, build, record, release) with its crash points in order.
        """
        tid = str(transfer["id"])
        partner = self.settings.partner_by_name(str(transfer["partner"]))
        if partner is None:
            await self._fail(tid, f"partner {transfer['partner']} no longer configured")
            return
        suspended = self.keys.book[partner.name].problem
        if suspended:
            reason = f"partner {partner.name} is suspended: {suspended}"
            log.error("transfer %s failed: %s", tid, reason)
            await self._fail(tid, reason)
            return
        instances = await self.catalog.transfer_instances(tid)
        if not instances:
            await self._fail(tid, "transfer has no instances")
            return
        folder = self.storage.outbox_staging / tid
        if folder.exists():
            shutil.rmtree(folder)  # a half-built set from before a crash
        paths = [self.storage.root / rel for _, rel, _ in instances]
        sops = [sop for sop, _, _ in instances]
        if partner.deidentify is not None:
            try:
                paths, sops, transfer = await self._deidentify(
                    tid, transfer, partner, paths, sops, folder / "work"
                )
            except (OSError, ValueError, BrokenProcessPool) as exc:
                reason = f"de-identification failed: {type(exc).__name__}"  # never the message: it may name the patient
                log.error("transfer %s failed: %s", tid, reason)
                await self._fail(tid, reason)
                shutil.rmtree(folder, ignore_errors=True)
                return
        paths = await self._compress(partner, paths, folder / "work")
        sizes = [p.stat().st_size for p in paths]
        for factor in (1.0, 0.8, 0.6, 0.4):
            try:
                plan = self._plan(partner, sizes, factor)
                built = await self._build_all(tid, transfer, partner, plan, paths, sops, folder)
                break
            except mailformat.MailFormatError as exc:
                log.error("transfer %s failed: %s", tid, exc)
                await self._fail(tid, str(exc))
                shutil.rmtree(folder, ignore_errors=True)
                return
            except TooLarge as exc:
                log.warning("transfer %s: %s; planning smaller mails", tid, exc)
                for item_dir in folder.iterdir():
                    if item_dir.name != "work":
                        shutil.rmtree(item_dir)
        else:
            reason = "mails stay above the partner's size limit however the study is split"
            await self._fail(tid, reason)
            shutil.rmtree(folder, ignore_errors=True)
            return
        shutil.rmtree(folder / "work", ignore_errors=True)
        # every mail was fsynced where it was built; their names become durable here, together, before the set
        # is recorded (a recorded set is moved into the outbox as it is found, even after a crash)
        await asyncio.to_thread(Spool.settle, folder)
        items = [(iid, mid, size, mdn_id) for mdn_id, b in built for iid, mid, size in b.items]
        # before the mails are queued: a crash here packages (and audits) again
        if self.ctx.audit is not None:
            rows = await self.catalog.transfer_audit_rows(tid)
            await self.ctx.audit.begin_sending(tid, partner.name, rows, len(items))
        await self.catalog.add_out_mails(
            tid,
            [
                (mid, n, len(items), f"spool/outbox/{iid}", size)
                for n, (iid, mid, size, _) in enumerate(items, 1)
            ],
            time.time(),
            mdn_ids=[mdn_id for _, _, _, mdn_id in items],
            receipts=partner.receipts,
            bytes_wire=sum(size for _, _, size, _ in items),
            proofs={mdn_id: (b.mic, b.digests) for mdn_id, b in built},
        )
        # crash here: the set is recorded but still staged; start-up moves it into the outbox (release_staged)
        await asyncio.to_thread(self.release, tid)
        # from here the mails are queued: the sender owns them
        log.info(
            "transfer %s: %d instances packaged into %d mails (%s, %s) for %s",
            tid,
            len(instances),
            len(built),
            partner.format,
            partner.compression,
            partner.name,
        )
        self.wakes.sender.set()

    async def _build_all(
        self,
        tid: str,
        transfer: dict[str, object],
        partner: Partner,
        plan: list[list[int]],
        paths: list[Path],
        sops: list[str],
        folder: Path,
    ) -> list[tuple[str, Built]]:
        """Every mail of the plan: [(the message id receipts name, what was built)]."""
        total = len(plan)
        subject = self.settings.mail.subject
        tag = formats.get(partner.format).subject_tag
        if tag and tag not in subject:
            subject = f"{subject} {tag}"
        # one mail per core at a time (each in a worker process); more would only add memory (each mail in flight
        # holds a few copies of itself)
        slots = asyncio.Semaphore(max(2, WORKERS))

        async def build(part: int, indexes: list[int]) -> tuple[str, Built]:
            header = mailformat.MailHeader(
                sender=self.settings.mail.address,
                recipient=partner.address,
                subject=subject,
                message_id=message_id(tid, part, self.settings.mail.address),
                set_id=tid,
                part=part,
                total=total,
                study_uid=str(transfer.get("study_uid") or ""),
                date=time.time(),
                notify=self.settings.mail.address if partner.receipts else "",
            )
            meta: dict[str, Any] = {
                "transfer": tid,
                "part": part,
                "total": total,
                "partner": partner.name,
                "message_id": header.message_id,
                "attempts": 0,
            }
            async with slots:
                built = await self._build(
                    self._job(
                        header, partner, [paths[i] for i in indexes], folder, meta, [sops[i] for i in indexes]
                    )
                )
            return header.message_id, built

        # every build finishes before an error is raised: no thread may still write into `folder` afterwards
        results = await asyncio.gather(
            *(build(part, indexes) for part, indexes in enumerate(plan, start=1)), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if not isinstance(r, BaseException)]

    def release(self, tid: str) -> None:
        """Move a completely built and recorded set from staging into the outbox queue."""
        folder = self.storage.outbox_staging / tid
        if not folder.exists():
            return
        self.outbox.adopt_all(sorted(p for p in folder.iterdir() if p.is_dir()))
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

    async def _claim(self, listed: dict[str, Any]) -> dict[str, Any] | None:
        """The transfer, claimed for packaging and still pending (as another node may have packaged it since the
        listing); None to pass it by."""
        tid = str(listed["id"])
        if await self.claims.take(PACKAGE, tid) is None:
            return None
        current = await self.catalog.transfer(tid)
        if current is None or current["state"] != TransferState.PENDING.value:
            await self.claims.release(PACKAGE, tid)
            return None
        return listed

    async def _fail(self, tid: str, reason: str) -> None:
        """Fail a transfer whose packaging failed, unless it is no longer pending: a node that lost its role while
        paused and finds the set recorded by the node that took over must not fail the mails that one queued."""
        if not await self.catalog.fail_pending_transfer(tid, time.time(), reason):
            log.warning(
                "transfer %s: packaged elsewhere meanwhile; this attempt (%s) is dropped", tid, reason
            )

    async def package_listed(self, listed: dict[str, Any]) -> bool:
        """Package one transfer of the pending list, if this node gets its claim and it is still pending; a failure
        fails the transfer (while pending) with the reason. False: stop this round (the disk or the catalog is
        away; the transfer stays pending)."""
        transfer = await self._claim(listed)
        if transfer is None:
            return True
        tid = str(transfer["id"])
        try:
            await self.package(transfer)
        except OSError as exc:
            if exc.errno is not None and not isinstance(exc, FileNotFoundError):
                # disk full or an I/O error: the transfer stays pending and is packaged again later
                log.warning("transfer %s: packaging paused: %s", tid, exc.strerror or type(exc).__name__)
                return False
            reason = (
                "an instance file is missing from storage"
                if isinstance(exc, FileNotFoundError)
                else f"packaging failed: {type(exc).__name__}: {exc}"
            )
            log.error("transfer %s failed: %s", tid, reason)
            await self._fail(tid, reason)
        except TRANSIENT_ERRORS as exc:
            # the catalog away for a moment (a Galera member restarting, a lost connection): the transfer stays
            # pending and is packaged again on the next turn
            log.warning("transfer %s: packaging paused: %s", tid, type(exc).__name__)
            return False
        except Exception as exc:
            log.exception("transfer %s: packaging failed", tid)
            await self._fail(tid, f"packaging failed: {type(exc).__name__}: {exc}")
        finally:
            await self.claims.release(PACKAGE, tid)
        return True

    async def run_forever(self) -> None:
        """Package pending transfers as they appear; never dies."""
        try:
            await self.warm()
        except (
            Exception
        ):  # the workers start again on first use; packaging falls back to threads if they cannot
            log.exception("packaging workers did not start")
        while True:
            try:
                pending = await self.catalog.transfers_in_state("out", TransferState.PENDING)
                self.progress.packager.beat(bool(pending))
                for listed in pending:
                    self.progress.packager.done()
                    if not await self.package_listed(listed):
                        break
                else:
                    self.progress.packager.idle()
                self.guard.ok()
            except Exception as exc:
                if not await self.guard.pause(exc):
                    return
            await wait_woken(self.wakes.packager, 5)
