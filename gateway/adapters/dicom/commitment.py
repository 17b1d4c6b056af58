"""Storage Commitment Push Model (PS3.4 Annex J), the gateway as SCU: ask a PACS to take responsibility for
instances (N-ACTION), and take its answer (N-EVENT-REPORT) on the same association or on a new one the PACS opens
to our DICOM port, as the PACS chooses (Orthanc always opens a new one; others use the same one while it is open).

Whichever way a report comes, it is written durably into the report box (`D:/spool/commitments/`) before the PACS
gets its N-EVENT-REPORT-RSP: a crash after the response loses nothing, and the forwarder applies the box to the
catalog (`stages.forward`). A report names its Transaction UID; only a transaction we asked for, of the PACS that
reports it, counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt

from gateway.adapters.dicom import scu
from gateway.config import Pacs
from gateway.storage import fsync_dir

log = logging.getLogger(__name__)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
MAX_REPORT = 32 * 1024 * 1024  # an N-EVENT-REPORT dataset is read up to this size (≈200 000 instances)
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class/instance conflict",
    0x0131: "duplicate transaction UID",
}


@dataclass(frozen=True)
class Report:
    """One N-EVENT-REPORT: the transaction, the instances committed and those that failed (uid, reason)."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]
    calling_ae: str = ""  # who reported it (the PACS's AE title)


def parse_report(ds: Dataset, calling_ae: str = "") -> Report:
    """The report in an N-EVENT-REPORT dataset (`ValueError` when it has no Transaction UID)."""
    txn = str(ds.get("TransactionUID", "") or "")
    if not txn:
        raise ValueError("storage commitment report without a Transaction UID")
    committed = tuple(
        str(item.get("ReferencedSOPInstanceUID", "")) for item in ds.get("ReferencedSOPSequence", []) or []
    )
    failed = []
    for item in ds.get("FailedSOPSequence", []) or []:
        code = int(item.get("FailureReason", 0x0110) or 0x0110)
        why = FAILURE_REASONS.get(code, "failure")
        failed.append((str(item.get("ReferencedSOPInstanceUID", "")), f"0x{code:04X} {why}"))
    return Report(txn, tuple(u for u in committed if u), tuple(f for f in failed if f[0]), calling_ae)


def read_report_dataset(data: bytes, transfer_syntax: str) -> Dataset:
    """The dataset of an N-EVENT-REPORT-RQ as it came over a presentation context."""
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != "1.2.840.10008.1.2.2"
    return read_dataset(BytesIO(data), implicit, little)


class ReportBox:
    """Reports waiting to be applied to the catalog: one JSON file each, written durably before the PACS is told
    we have it (any process may write; the forwarder reads and removes)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, report: Report) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{report.transaction_uid}.{time.time_ns()}.{os.getpid()}.json"
        tmp = self.folder / f".{name}.tmp"
        data = json.dumps(
            {
                "transaction_uid": report.transaction_uid,
                "committed": list(report.committed),
                "failed": [list(f) for f in report.failed],
                "calling_ae": report.calling_ae,
            }
        ).encode()
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        target = self.folder / name
        os.replace(tmp, target)
        fsync_dir(self.folder)
        return target

    def has(self, transaction_uid: str) -> bool:
        return self.folder.exists() and any(self.folder.glob(f"{transaction_uid}.*.json"))

    def pending(self) -> list[tuple[Path, Report]]:
        """Saved reports, oldest first; an unreadable file is set aside (renamed .bad) with a log line."""
        if not self.folder.exists():
            return []
        out = []
        for path in sorted(self.folder.glob("*.json"), key=lambda p: p.name.split(".")[-3:]):
            try:
                doc = json.loads(path.read_bytes())
                out.append(
                    (
                        path,
                        Report(
                            str(doc["transaction_uid"]),
                            tuple(str(u) for u in doc["committed"]),
                            tuple((str(u), str(r)) for u, r in doc["failed"]),
                            str(doc.get("calling_ae", "")),
                        ),
                    )
                )
            except (ValueError, KeyError, TypeError, OSError):
                log.error("storage commitment report %s is unreadable; set aside", path.name)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
        return out

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)


def action_dataset(transaction_uid: str, items: list[tuple[str, str]]) -> Dataset:
    """The N-ACTION-RQ dataset: the Transaction UID and the (SOP Class, SOP Instance) of each instance."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    refs = []
    for sop_class, sop_uid in items:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop_uid
        refs.append(ref)
    ds.ReferencedSOPSequence = refs
    return ds


def request(
    pacs: Pacs, transaction_uid: str, items: list[tuple[str, str]], box: ReportBox, hold: float
) -> str | None:
    """Ask the PACS to commit `items` under `transaction_uid`; blocking (run in a thread). None when the PACS
    accepted the request (the report follows, on this association within `hold` seconds, or later on a new one),
    else why not. While the association is held, a report arriving on it is saved to the box and answered; the
    hold ends early once the box has the report, whichever way it came.

    Size: one association from start to end (request, hold, release), every step bounded by the PACS's timeout.
    """
    got = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, Dataset | None]:
        try:
            ds = event.event_information
            report = parse_report(ds, pacs.ae_title)
            if report.transaction_uid != transaction_uid:
                log.info("PACS %s reported another transaction on this association", pacs.name)
            box.save(report)
        except (ValueError, OSError) as exc:
            log.error("PACS %s: storage commitment report not taken: %s", pacs.name, exc)
            return 0x0110, None
        got.set()
        return 0x0000, None

    assoc = scu.associate(
        pacs,
        [(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])],
        [(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    if not assoc.is_established:
        return "association for storage commitment rejected, aborted or unreachable"
    try:
        if not any(str(cx.abstract_syntax) == STORAGE_COMMITMENT for cx in assoc.accepted_contexts):
            return "the PACS does not offer storage commitment"
        status, _ = assoc.send_n_action(
            action_dataset(transaction_uid, items), 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
        code = int(getattr(status, "Status", -1)) if status else None
        if code is None:
            return f"no answer to the storage commitment request within {pacs.timeout:g} s"
        if code != 0x0000:
            return f"the PACS refused the storage commitment request (0x{code:04X})"
        deadline = time.monotonic() + hold
        while assoc.is_established and time.monotonic() < deadline:
            if got.wait(0.1) or box.has(transaction_uid):
                break
        return None
    finally:
        if assoc.is_established:
            assoc.release()
