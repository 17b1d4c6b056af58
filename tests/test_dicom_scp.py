"""The C-STORE SCP against real SCUs (pynetdicom's in-process, DCMTK's in the end-to-end tests)."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from gateway.adapters.dicom import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    DicomScp,
    Received,
    file_meta,
)
from gateway.core.dicominfo import NotDicomError, dataset_offset
from gateway.devtools.studies import make_study
from tests import dicomscu


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "ts"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.123456789012345678", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.7", "2.25.1", "1.2.840.10008.1.2.4.90"),
    ],
)
def test_file_meta_is_what_pydicom_writes(sop_class, sop_instance, ts):  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(ts)
    )
    write_file_meta_info(buf, meta)  # type: ignore[arg-type]
    assert file_meta(sop_class, sop_instance, ts) == buf.getvalue()


class Collector:
    """A store callback that keeps what it was given (or fails the way it is told to)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "kept"
        self.dir.mkdir()
        self.received: list[Received] = []
        self.fail: Exception | None = None

    def __call__(self, received: Received) -> None:
        if self.fail is not None:
            raise self.fail
        kept = self.dir / f"{len(self.received)}.dcm"
        received.temp_path.rename(kept)
        self.received.append(
            Received(
                kept, received.called_ae, received.calling_ae, received.peer, received.sha256, received.size
            )
        )


@pytest.fixture
def scp(tmp_path):  # type: ignore[no-untyped-def]
    collector = Collector(tmp_path)
    server = DicomScp(
        "GW", {"TO_B"}, ("127.0.0.1", 0), tmp_path / "tmp", collector, timeout=5, maximum_associations=2
    )
    server.start()
    yield server, collector
    server.stop()


def _scu(calling: str = "MODALITY") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Q/R FIND: not offered here
    return ae


def test_instances_arrive_with_their_dataset_bytes_and_digest(scp, tmp_path):  # type: ignore[no-untyped-def]
    server, collector = scp
    files = make_study(tmp_path / "s", ct=5, mr=0, sc=0, size=64)
    ae = _scu()
    assoc = ae.associate("127.0.0.1", server.port, ae_title="TO_B")
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    assert CTImageStorage in accepted and "1.2.840.10008.5.1.4.1.2.2.1" not in accepted
    assert assoc.send_c_echo().Status == 0
    for f in files:
        status = assoc.send_c_store(pydicom.dcmread(f))
        assert status.Status == 0
    assoc.release()
    assert len(collector.received) == len(files)

    for f, got in zip(files, collector.received, strict=True):
        data = got.temp_path.read_bytes()
        sent = pydicom.dcmread(f)
        assert got.sha256 == hashlib.sha256(data).hexdigest() and got.size == len(data)
        assert got.called_ae == "TO_B" and got.calling_ae == "MODALITY" and got.peer == "127.0.0.1"
        stored = pydicom.dcmread(got.temp_path)
        assert stored.SOPInstanceUID == sent.SOPInstanceUID
        assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert stored.PixelData == sent.PixelData
        assert dataset_offset(data) < len(data)


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (OSError(28, "No space left on device"), STATUS_OUT_OF_RESOURCES),
        (NotDicomError("no UIDs"), STATUS_CANNOT_UNDERSTAND),
    ],
)
def test_store_failures_become_statuses_and_leave_no_file(scp, tmp_path, failure, status):  # type: ignore[no-untyped-def]
    server, collector = scp
    collector.fail = failure
    (f,) = make_study(tmp_path / "s", ct=1, mr=0, sc=0, size=16)
    assoc = _scu().associate("127.0.0.1", server.port, ae_title="TO_B")
    assert assoc.send_c_store(pydicom.dcmread(f)).Status == status
    assoc.release()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert server.refused == 1


def test_unknown_called_ae_and_too_many_associations_are_rejected(scp):  # type: ignore[no-untyped-def]
    server, _ = scp
    # a rejection is judged by the A-ASSOCIATE-RJ PDU the requestor received (see tests/dicomscu.py)
    assoc, rj = dicomscu.associate(_scu(), server.port, "NOBODY")
    assert not assoc.is_established and dicomscu.rejection(rj) == (1, 1, 7)
    held = [_scu().associate("127.0.0.1", server.port, ae_title="GW") for _ in range(2)]
    assert all(a.is_established for a in held)
    third, rj = dicomscu.associate(_scu(), server.port, "GW")
    assert not third.is_established and dicomscu.rejection(rj) == (2, 3, 2)  # local limit exceeded
    for a in held:
        a.release()
    again = _scu().associate("127.0.0.1", server.port, ae_title="GW")
    assert again.is_established, "slots are given back when associations end"
    again.release()


def test_a_silent_peer_is_dropped_and_others_are_served_meanwhile(scp):  # type: ignore[no-untyped-def]
    server, _ = scp
    with socket.create_connection(("127.0.0.1", server.port)) as silent:
        assoc = _scu().associate("127.0.0.1", server.port, ae_title="GW")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        silent.settimeout(15)
        closed = threading.Event()
        try:
            closed.set() if silent.recv(100) == b"" else None
        except (ConnectionResetError, TimeoutError):
            closed.set()
        assert closed.is_set(), "the silent connection was not dropped after the timeout"


def _report(txn: str, committed: list[str], failed: list[str]) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.TransactionUID = txn
    refs = []
    for uid in committed + failed:
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = uid
        if uid in failed:
            ref.FailureReason = 0x0112
        refs.append(ref)
    ds.ReferencedSOPSequence = [r for r in refs if "FailureReason" not in r]
    ds.FailedSOPSequence = [r for r in refs if "FailureReason" in r]
    return ds


def _reporter(calling: str) -> tuple[AE, list[object]]:
    """A PACS opening a new association to report storage commitment, as Orthanc does (SCP role proposed)."""
    from pynetdicom import build_role

    from gateway.adapters.dicom.commitment import STORAGE_COMMITMENT

    ae = AE(ae_title=calling)
    ae.add_requested_context(STORAGE_COMMITMENT)
    ae.add_requested_context(CTImageStorage)
    return ae, [build_role(STORAGE_COMMITMENT, scp_role=True)]


def test_only_the_pacs_we_ask_may_report_storage_commitment_and_it_may_only_report(tmp_path):  # type: ignore[no-untyped-def]
    """A report is saved (durably, before it is answered) only from the PACS configured for commitment, by its AE
    title and address; that PACS cannot store through the door reports use, and a modality cannot report."""
    from gateway.adapters.dicom.commitment import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, ReportBox

    box = ReportBox(tmp_path / "commitments")
    collector = Collector(tmp_path)
    told: list[int] = []
    server = DicomScp(
        "GW",
        {"TO_B"},
        ("127.0.0.1", 0),
        tmp_path / "tmp",
        collector,
        allowed_calling_ae=("MODALITY",),
        timeout=5,
        report_peers={"PACS": (frozenset({"127.0.0.1"}), "GW_SCU")},
        report_box=box,
        on_report=lambda: told.append(1),
    )
    server.start()
    try:
        ae, roles = _reporter("PACS")
        assoc = ae.associate("127.0.0.1", server.port, ae_title="GW_SCU", ext_neg=roles)
        assert assoc.is_established
        status, _ = assoc.send_n_event_report(
            _report("1.2.3.9", ["1.2.3.1"], ["1.2.3.2"]), 2, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
        assert status.Status == 0
        assoc.release()
        [(_, saved)] = box.pending()
        assert (saved.transaction_uid, saved.committed, saved.failed, saved.calling_ae) == (
            "1.2.3.9",
            ("1.2.3.1",),
            (("1.2.3.2", "0x0112 no such object instance"),),
            "PACS",
        )
        assert told == [1]

        # the PACS's door is for reports only: a C-STORE through it ends the association, nothing is stored
        (f,) = make_study(tmp_path / "s", ct=1, mr=0, sc=0, size=16)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="GW_SCU", ext_neg=roles)
        assert assoc.is_established
        rsp = assoc.send_c_store(pydicom.dcmread(f))
        assert not rsp or "Status" not in rsp
        assert collector.received == []

        # a modality may store, not report; a stranger may not even associate
        ae, roles = _reporter("MODALITY")
        assoc = ae.associate("127.0.0.1", server.port, ae_title="TO_B", ext_neg=roles)
        assert assoc.is_established
        status, _ = assoc.send_n_event_report(
            _report("1.2.3.10", ["1.2.3.1"], []), 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
        assert not status or "Status" not in status
        ae, roles = _reporter("STRANGER")
        stranger, rj = dicomscu.associate(ae, server.port, "GW_SCU")
        assert not stranger.is_established and dicomscu.rejection(rj) == (1, 1, 3)
        assert [r.transaction_uid for _, r in box.pending()] == ["1.2.3.9"]
    finally:
        server.stop()
