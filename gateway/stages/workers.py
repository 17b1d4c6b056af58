"""What runs in the gateway's worker processes (one per core; pure CPU, so the event loop never waits on it):
building one mail of a set for packaging (stage 3) and opening one S/MIME mail for ingest (stage 6). Each takes a
picklable job and hands back small results and file names; certificates and keys are read from their files in the
worker, never sent to it."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway import formats
from gateway.addressbook import load_address_book
from gateway.children import exit_with
from gateway.config import Partner, Settings
from gateway.core import inbound, mailformat, partial
from gateway.core.dicominfo import InstanceInfo
from gateway.core.mime import wire_ready
from gateway.logsetup import setup_logging
from gateway.spool import CONTENT, Spool
from gateway.stages import worker_identity
from gateway.storage import start_writeback, write_all


def item_id(transfer_id: str, part: int) -> str:
    """The outbox queue item of one mail."""
    return f"{transfer_id}.{part:05d}"


WORKERS = max(1, os.cpu_count() or 1)  # worker processes: one per core


def start_worker(gateway_pid: int) -> None:
    """A worker process ends with the gateway (see `gateway.children`) and yields the cores to the event loop and
    the DICOM receivers, whose latency others wait on: a modality for its C-STORE response, a mail server for the
    next command. Bulk work can wait a moment."""
    exit_with(gateway_pid)
    os.nice(5)
    setup_logging(
        logging.getLevelName(logging.getLogger().getEffectiveLevel())
    )  # scrubbed, like the gateway's


class TooLarge(Exception):
    """A built mail came out above the size limit: plan again with a smaller capacity."""


@dataclass(frozen=True)
class BuildJob:
    """Everything needed to build one mail and write its queue item(s), picklable for a worker process."""

    header: mailformat.MailHeader
    partner: Partner
    paths: tuple[Path, ...]
    folder: Path
    meta: dict[str, Any]
    limit: int  # the partner's largest mail
    signer: tuple[Path, Path]  # our S/MIME certificate and key files (read by the worker, never sent to it)
    recipient_pem: bytes | None  # the partner's S/MIME certificate
    pgp_fingerprint: str = ""  # the partner's OpenPGP key
    sops: tuple[str, ...] = ()  # the SOP Instance UID of each path


@dataclass(frozen=True)
class Built:
    """One built mail: its queue items [(item id, message id, size)] (several for message/partial fragments),
    the digest of its signed content (`mdn.content_mic`) and the SHA-256 of each instance as it went in."""

    items: list[tuple[str, str, int]]
    mic: str
    digests: dict[str, str]


def _seal_keys(job: BuildJob, pgp: formats.PgpSealer | None) -> formats.SealKeys:
    """The keys the partner's format needs, loaded where the mail is built (certificates and keys are read from
    their files in a worker process, never sent to it)."""
    if formats.get(job.partner.format).key == "pgp":
        return formats.SealKeys(pgp=pgp, fingerprint=job.pgp_fingerprint)
    if job.recipient_pem is None:
        raise mailformat.MailFormatError(f"partner {job.partner.name} has no S/MIME certificate")
    return formats.SealKeys(
        identity=worker_identity(*job.signer), recipient=x509.load_pem_x509_certificate(job.recipient_pem)
    )


def build_mail(job: BuildJob, pgp: formats.PgpSealer | None = None) -> Built:
    """Build one mail (and its fragments) in the partner's format straight into its staged queue item, and keep
    what its receipt must prove (the content's digest, each instance's SHA-256). Runs in a worker process or,
    for a format that is not `in_worker` (OpenPGP: `pgp` given), a thread."""
    header, partner = job.header, job.partner
    fmt, keys = formats.get(partner.format), _seal_keys(job, pgp)
    item_dir = job.folder / item_id(header.set_id, header.part)
    with contextlib.ExitStack() as files:
        parts = [(files.enter_context(p.open("rb")), p.stat().st_size) for p in job.paths]
        written, size = Spool.stage_content(
            item_dir, lambda sink: fmt.write(header, parts, partner.compression, keys, sink)
        )
    digests = dict(zip(job.sops, written.digests, strict=False))
    if partner.split == "partial" and size > job.limit:
        return Built(_fragments(job, item_dir), written.mic, digests)
    if size > job.limit:
        shutil.rmtree(item_dir, ignore_errors=True)
        raise TooLarge(f"built mail has {size} bytes, above {job.limit}")
    # crash after this write: the transfer is still pending; packaging starts over and rebuilds the folder
    Spool.stage_meta(item_dir, {**job.meta, "wire_ready": written.wire_ready})  # the sender need not scan it
    return Built([(item_dir.name, header.message_id, size)], written.mic, digests)


def _fragments(job: BuildJob, item_dir: Path) -> list[tuple[str, str, int]]:
    """A built mail above the partner's limit cut into message/partial fragments, each a queue item of its own
    (the whole mail's item is removed)."""
    header = job.header
    data = (item_dir / CONTENT).read_bytes()
    shutil.rmtree(item_dir)
    fixed = mailformat.outer_headers(header)[:4]  # From, To, Subject (replaced), Date
    pieces = partial.fragment(
        data,
        job.limit,
        header.message_id.strip("<>"),
        [h for h in fixed if h[0] != "Subject"],
        header.subject,
    )
    out = []
    for n, piece in enumerate(pieces, start=1):
        iid = f"{item_id(header.set_id, header.part)}.f{n:04d}"
        mid = f"<{n}.{header.message_id.strip('<>')}>"
        # crash after this write: the transfer is still pending; packaging starts over
        meta = {**job.meta, "message_id": mid, "fragment": n, "wire_ready": wire_ready(piece)}
        Spool.prepare_item(job.folder, iid, piece, meta)
        out.append((iid, mid, len(piece)))
    return out


_SENDERS: dict[bytes, dict[str, inbound.Sender]] = {}


def inspect_in_worker(mail: bytes | Path, settings: Settings) -> inbound.Accepted | inbound.ReceiptIn:
    """`inbound.inspect_mail` in a worker process: our identity and the address book are loaded there (once per
    configuration), because certificates and keys cannot be sent between processes. Given a path, the worker
    reads the mail itself, so that it does not travel through a pipe (and the gateway's interpreter lock)."""
    raw = mail.read_bytes() if isinstance(mail, Path) else mail
    key = hashlib.sha256(pickle.dumps(settings)).digest()
    if key not in _SENDERS:
        _SENDERS.clear()
        _SENDERS[key] = load_address_book(settings).senders()
    identity = worker_identity(settings.smime_cert, settings.smime_key)
    return inbound.inspect_mail(raw, identity, _SENDERS[key], None, settings.mail.max_unpacked_size)


@dataclass(frozen=True)
class Unpacked:
    """An accepted mail whose instances were written to temp files on D: where it was opened, so
    that the instances never travel back through a pipe into the gateway's process: `accepted` without its
    parts' bytes, and per instance (info, temp file, SHA-256, size)."""

    accepted: inbound.Accepted
    files: list[tuple[InstanceInfo, Path, str, int]]


def unpack_parts(accepted: inbound.Accepted, tmp: Path) -> Unpacked:
    """Write an accepted mail's instances into `tmp` (the storage's temp folder, removed at start-up after a
    crash) and fsync them, here where the mail was opened: ready to be named by `Storage.place_synced`. The
    kernel starts writing each file as soon as it is written, so the fsyncs at the end wait little."""
    files: list[tuple[InstanceInfo, Path, str, int]] = []
    try:
        for n, (info, data) in enumerate(accepted.parts):
            path = tmp / f".mail.{os.getpid()}.{time.monotonic_ns()}.{n}.tmp"
            files.append((info, path, hashlib.sha256(data).hexdigest(), len(data)))
            with path.open("wb", buffering=0) as f:
                write_all(f, data)
                start_writeback(f.fileno())
        for _, path, _, _ in files:
            with path.open("rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        for _, path, _, _ in files:
            path.unlink(missing_ok=True)  # disk full, I/O error: no temp file stays behind
        raise
    return Unpacked(dataclasses.replace(accepted, parts=[]), files)


def remove_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def unpack_in_worker(path: Path, settings: Settings, tmp: Path) -> Unpacked | inbound.ReceiptIn:
    """Open a queued mail (`inspect_in_worker`) and write its instances to temp files, in a worker process: the
    gateway's process gets file names and a few hundred bytes instead of the decrypted instances."""
    got = inspect_in_worker(path, settings)
    return got if isinstance(got, inbound.ReceiptIn) else unpack_parts(got, tmp)


def opens_in_worker(raw: bytes) -> bool:
    """True when the mail's format is opened in a worker process (S/MIME: pure CPU); OpenPGP (GnuPG is a process
    anyway) and anything unrecognised are opened in the gateway process."""
    try:
        fmt = formats.for_content_type(mailformat.read_outer(raw).content_type)
    except mailformat.MailFormatError:
        return False
    return fmt is not None and fmt.in_worker
