"""Stage 7, forward: every instance that arrived by mail goes on to each configured PACS (C-STORE SCU).

Per PACS, due instances are sent over up to `associations` associations at once, each file streamed as stored
(no decode) in a context of its own transfer syntax; where the PACS does not take that syntax, the instance is
converted for it (inflated, decompressed, byte-swapped) into Explicit/Implicit VR Little Endian, and what D: holds
never changes. Every association and DIMSE step is bounded by the PACS's `timeout`. Success and the
warning statuses (0xB000, 0xB006, 0xB007) count as accepted; instances from a partner with `coerce` go with the
patient identity `stages.coercion` decides (D: keeps what arrived); a failure status or a failed association is retried
with backoff (`retry_base`·2^n), and after `max_attempts` the instance is recorded as rejected with the PACS's
status: "sent" never hides a failed import. pynetdicom blocks, so each association runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import _config, evt
from pynetdicom.pdu import A_ASSOCIATE_RJ

from gateway.adapters.dicom import commitment, scu
from gateway.auditing import Auditor
from gateway.catalog import Catalog
from gateway.config import Pacs, Settings
from gateway.core import coerce, deid
from gateway.core.coerce import Coercion
from gateway.core.deid import Reidentification
from gateway.stages.coercion import Coercer, now_local
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


NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# Stream each stored file as it is instead of reading it whole into memory (process-wide, set once; the gateway's
# only SCU is this stage; tests/test_contracts.py checks pynetdicom still reads it)
_config.STORE_SEND_CHUNKED_DATASET = True


def requested_contexts(items: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """What to propose: per SOP class each stored transfer syntax on its own (the file goes as it is), and where
    one is not native little endian, a fallback context offering Explicit and Implicit VR Little Endian (the file
    is converted for this PACS only; what D: holds never changes)."""
    contexts: list[tuple[str, list[str]]] = []
    for sop_class in sorted({str(i["sop_class_uid"]) for i in items}):
        stored = sorted({str(i["transfer_syntax"]) for i in items if str(i["sop_class_uid"]) == sop_class})
        contexts += [(sop_class, [ts]) for ts in stored]
        if any(ts not in NATIVE for ts in stored):
            contexts.append((sop_class, list(NATIVE)))
    return contexts[:128]


def as_native(path: Path) -> Dataset:
    """The stored instance as a dataset pynetdicom can send in a native little-endian context: deflated data is
    read as it is (pynetdicom re-encodes it), compressed pixel data is decoded, big endian pixel data swapped.
    Raises `ValueError` when this cannot be done (no decoder for the syntax, pixel data of an unknown shape)."""
    syntax = UID(ExplicitVRLittleEndian)
    try:
        ds = dcmread(path)
        syntax = UID(str(ds.file_meta.TransferSyntaxUID))
        if syntax.is_compressed:
            ds.decompress(generate_instance_uid=False)
        elif not syntax.is_little_endian:
            if "PixelData" in ds:
                pixels = ds.pixel_array
                ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.set_original_encoding(False, True, ds.original_character_set)
        return ds
    except Exception as exc:  # a decoder's error, whatever its kind, means "cannot convert"
        raise ValueError(f"the PACS does not take {syntax.name} and it cannot be converted here") from exc


def changed(ds: Dataset, coercion: Coercion | None, back: Reidentification | None) -> Dataset:
    """The instance with the patient identity it has here (`stages.coercion`; D: keeps what arrived)."""
    if coercion is not None:
        coerce.apply(ds, coercion, now_local())
    if back is not None:
        deid.reidentify(ds, back, now_local())
    return ds


def _describe(status: int | None, error: str | None) -> str:
    return error or f"PACS answered 0x{status:04X}"


def _rejection(rj: A_ASSOCIATE_RJ | None = None) -> str:
    """How a PACS's A-ASSOCIATE-RJ is reported. Judged by the PDU itself: pynetdicom 3.0 reports a rejection that
    arrives before its requesting thread looks again (a loaded machine) as an abort, without a word."""
    if rj is None:
        return "rejected"
    return f"rejected: {rj.reason_str} ({'permanent' if rj.result == 1 else 'transient'})"


def send_batch(
    pacs: Pacs, items: list[dict[str, Any]], root: Path, timeout: float | None = None
) -> list[Outcome]:
    """One association, every item; blocking (run in a thread). Every step is bounded by the PACS's timeout:
    pynetdicom notices a peer's abort only when its timeout runs out.

    Size: one association from start to end, every step bounded by the PACS's timeout.
    """
    timeout = pacs.timeout if timeout is None else timeout
    contexts = requested_contexts(items)
    rejected: list[A_ASSOCIATE_RJ] = []  # seen on pynetdicom's DUL thread: see _rejection

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejected.append(event.pdu)

    assoc = scu.associate(pacs, contexts, [(evt.EVT_PDU_RECV, on_pdu)], timeout)
    if not assoc.is_established:
        if rejected or assoc.is_rejected:
            why = _rejection(rejected[0] if rejected else None)
        else:
            why = "aborted or unreachable"
        return [Outcome(str(i["sop_uid"]), None, f"association {why}") for i in items]
    accepted: dict[str, set[str]] = defaultdict(set)
    for cx in assoc.accepted_contexts:
        accepted[str(cx.abstract_syntax)].add(str(cx.transfer_syntax[0]))
    proposed = {(sop, ts) for sop, syntaxes in contexts for ts in syntaxes}
    outcomes = []
    try:
        for i in items:
            sop_class, syntax = str(i["sop_class_uid"]), str(i["transfer_syntax"])
            if (sop_class, syntax) not in proposed:
                outcomes.append(
                    Outcome(str(i["sop_uid"]), None, "too many kinds in one association; next round")
                )
                continue
            path = root / str(i["path"])
            if i.get("hold"):  # the identity it must have in the PACS could not be decided: not sent as it is
                outcomes.append(Outcome(str(i["sop_uid"]), None, str(i["hold"])))
                continue
            changes = (i.get("coerce"), i.get("reidentify"))
            try:
                if syntax in accepted[sop_class]:
                    rsp = assoc.send_c_store(
                        path if changes == (None, None) else changed(dcmread(path), *changes)
                    )
                elif accepted[sop_class] & set(NATIVE):
                    rsp = assoc.send_c_store(changed(as_native(path), *changes))
                else:
                    name = UID(sop_class).name
                    outcomes.append(
                        Outcome(str(i["sop_uid"]), None, f"the PACS accepted no transfer syntax for {name}")
                    )
                    continue
            except (ValueError, OSError, RuntimeError, AttributeError) as exc:
                outcomes.append(Outcome(str(i["sop_uid"]), None, str(exc)[:200] or type(exc).__name__))
                continue
            status = int(getattr(rsp, "Status", -1)) if rsp else None
            if status is None:
                outcomes.append(
                    Outcome(str(i["sop_uid"]), None, f"no answer within {timeout:g} s (association aborted?)")
                )
            else:
                outcomes.append(Outcome(str(i["sop_uid"]), status))
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


async def send_parallel(pacs: Pacs, items: list[dict[str, Any]], root: Path) -> list[Outcome]:
    """The items over up to `pacs.associations` associations at once (one thread each)."""
    n = max(1, min(pacs.associations, len(items)))
    shares = [items[k::n] for k in range(n)]
    results = await asyncio.gather(*(asyncio.to_thread(send_batch, pacs, share, root) for share in shares))
    return [o for r in results for o in r]


async def purge_accepted(
    settings: Settings, storage: Storage, catalog: Catalog, now: float, audit: Auditor | None = None
) -> int:
    """Free the space of instances every PACS accepted more than `storage.keep_days_after_pacs` days ago (their
    audit event first, while the patient can still be read from the files; a crash after it purges and writes the
    same event again, which the trail keeps once)."""
    if not settings.pacs or settings.keep_days_after_pacs <= 0:
        return 0
    cutoff = now - settings.keep_days_after_pacs * 86400
    purged = 0
    doomed = await catalog.purgeable(len(settings.pacs), cutoff)
    if doomed and audit is not None:
        await audit.purged(await catalog.audit_rows([sop for sop, _ in doomed]))
    for sop_uid, path in doomed:
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
        self.box = commitment.ReportBox(ctx.storage.commitments)
        self.coercer = Coercer(ctx.settings, ctx.catalog)

    async def run_once(self, now: float | None = None) -> int:
        try:
            tried = await self._try_due(now)
            return tried + await self.commit_round(now)
        finally:
            self.progress.forwarder.idle()

    # ------------------------------------------------------------------------------- storage commitment
    async def commit_round(self, now: float | None = None) -> int:
        """Apply the PACS's saved reports, ask again where a report is overdue, and ask each PACS with storage
        commitment to commit what it stored (in batches of `commitment_batch`); how many moved."""
        moved = await self.apply_reports()
        for pacs in self.settings.pacs:
            if not pacs.storage_commitment:
                continue
            t = now or time.time()
            late = await self.catalog.commitments_asked(pacs.name, before=t - pacs.commitment_timeout)
            if late:
                overdue = f"no storage commitment report within {pacs.commitment_timeout:g} s"
                moved += await self._commit_failed(pacs, late, overdue, ask_again=True)
            due = await self.catalog.commitments_due(pacs.name, t, pacs.commitment_batch)
            if not due:
                continue
            txn = str(generate_uid())
            sops = [sop for sop, _, _ in due]
            # recorded before the request goes out, so that a report arriving at once finds its transaction
            await self.catalog.record_commitment(sops, pacs.name, "stored", "requested", time.time(), txn=txn)
            why = await asyncio.to_thread(
                commitment.request,
                pacs,
                txn,
                [(sop_class, sop) for sop, sop_class, _ in due],
                self.box,
                pacs.commitment_hold,
            )
            if why is not None:
                log.warning(
                    "PACS %s: storage commitment of %d instances not requested: %s", pacs.name, len(due), why
                )
                moved += await self._commit_failed(pacs, [(sop, n) for sop, _, n in due], why, ask_again=True)
            else:
                log.info("PACS %s: asked to commit %d instances (transaction %s)", pacs.name, len(due), txn)
            moved += await self.apply_reports()
        return moved

    async def apply_reports(self) -> int:
        """Every saved storage commitment report into the catalog: committed instances are accepted, failed ones
        and those the report leaves out are retried or, after `max_attempts`, recorded as not committed."""
        moved = 0
        for path, report in await asyncio.to_thread(self.box.pending):
            pacs_nodes = [
                p for p in self.settings.pacs if p.storage_commitment and p.ae_title == report.calling_ae
            ]
            for pacs in pacs_nodes:
                asked = dict(await self.catalog.commitments_asked(pacs.name, txn=report.transaction_uid))
                if not asked:
                    continue
                committed = [sop for sop in report.committed if sop in asked]
                if committed:
                    await self.catalog.record_commitment(
                        committed, pacs.name, "accepted", "committed", time.time()
                    )
                    self.accepted += len(committed)
                failed = dict(report.failed)
                for reason in sorted(set(failed.values())):
                    sops = [(sop, asked[sop]) for sop, r in failed.items() if r == reason and sop in asked]
                    moved += await self._commit_failed(pacs, sops, f"not committed by the PACS: {reason}")
                said = set(report.committed) | set(failed)
                left_out = [(sop, n) for sop, n in asked.items() if sop not in said]
                if left_out:
                    moved += await self._commit_failed(
                        pacs, left_out, "missing from the PACS's commitment report"
                    )
                moved += len(committed)
                log.info(
                    "PACS %s: transaction %s: %d committed, %d failed, %d left out",
                    pacs.name,
                    report.transaction_uid,
                    len(committed),
                    len(failed),
                    len(left_out),
                )
            if not pacs_nodes:
                log.warning(
                    "a storage commitment report from %r, which is no PACS we ask: ignored", report.calling_ae
                )
            await asyncio.to_thread(self.box.done, path)
        if moved:
            self.wakes.receipts.set()  # receipts wait for the commitment
        return moved

    async def _commit_failed(
        self, pacs: Pacs, sops: list[tuple[str, int]], why: str, *, ask_again: bool = False
    ) -> int:
        """Instances the PACS did not commit: stored again (a failure in its report: the next C-STORE is the next
        attempt) or only asked again (`ask_again`: no report, or the request failed; each request counts as an
        attempt) after a back-off, until `max_attempts`; then recorded as not committed, with why."""
        t = time.time()
        added = 1 if ask_again else 0
        final = [sop for sop, n in sops if n + added >= pacs.max_attempts]
        again = [sop for sop, n in sops if n + added < pacs.max_attempts]
        if final:
            await self.catalog.record_commitment(
                final, pacs.name, "rejected", "failed", t, attempts_added=added, error=why
            )
            self.rejected += len(final)
            log.error("PACS %s: %d instances not committed (%s): reported", pacs.name, len(final), why)
        if again:
            delay = pacs.retry_base * 2 ** (min(n for _, n in sops) - 1 + added)
            await self.catalog.record_commitment(
                again,
                pacs.name,
                "stored" if ask_again else "retry",
                "due" if ask_again else None,
                t,
                attempts_added=added,
                next_attempt=t + delay,
                error=why,
            )
        return len(sops)

    async def _try_due(self, now: float | None) -> int:
        """Try every due forward once; return how many were tried.

        Size: one round of due forwards with each outcome recorded where it happens.
        """
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
            await self.coercer.attach(items, self.storage.root)
            outcomes = await send_parallel(pacs, items, self.storage.root)
            # the audit record before the catalog's: a crash between them forwards (and records) again
            if self.ctx.audit is not None:
                accepted = {o.sop_uid for o in outcomes if o.status in ACCEPTED}
                rows = [
                    (str(i["study_uid"]), str(i["sop_class_uid"]), str(i["path"]))
                    for i in items
                    if str(i["sop_uid"]) in accepted
                ]
                if rows:
                    await self.ctx.audit.forwarded(name, rows, f"{time.time():.6f}")
            self.progress.forwarder.done()  # accepted, refused or retried later: each is an outcome
            attempts_of = {str(i["sop_uid"]): int(i["attempts"]) + 1 for i in items}
            for o in outcomes:
                attempts = attempts_of[o.sop_uid]
                t = time.time()
                if o.status in ACCEPTED:
                    # with storage commitment, a C-STORE success is only "stored": the PACS commits it or not
                    state = "stored" if pacs.storage_commitment else "accepted"
                    await self.catalog.record_forward(o.sop_uid, name, state, attempts, t, status=o.status)
                    self.accepted += state == "accepted"
                    continue
                error = _describe(o.status, o.error)
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
        await self.work_loop(self.run_once, self.wakes.forwarder)
