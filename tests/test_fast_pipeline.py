"""The fast tier: two whole gateways in this process, through in-process mail nodes (`tests/fakemail.py`).

Every stage runs as in production (the real adapters, S/MIME in worker processes, GnuPG for OpenPGP), one step at
a time, so the tests say exactly what happened without waiting for anything: `send` queues a study at A, A
packages and sends it, B fetches, ingests and answers with a receipt, A records the receipt. No root, no mail
cluster; the real-peer tier (`test_e2e*.py`) covers the same path through Postfix and Dovecot.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from pydicom import dcmread

from gateway import config, formats
from gateway.core import mailformat, mime
from gateway.core.mailformat import MailHeader
from gateway.core.smime import Identity
from gateway.devtools.studies import make_study
from gateway.formats import MailFormat, PartnerKeys, PgpOpener, SealKeys
from tests import fakemail, fastgw


class BoxedFormat(MailFormat):
    """A fourth format, as a newcomer would add one: the S/MIME mail of `smime`, base64 once more inside an
    `application/x-dmg-boxed` body. It has its own envelope (so inbound dispatch must find it by Content-Type),
    reuses S/MIME for the cryptography and receipts, and is built in a thread (it is not importable by the
    worker processes, which only know the formats of `gateway/formats/__init__.py`)."""

    name: ClassVar[str] = "boxed"
    key: ClassVar[str] = "smime"
    key_label: ClassVar[str] = "an S/MIME certificate"
    envelope: ClassVar[str] = "boxed S/MIME"
    content_types: ClassVar[tuple[str, ...]] = ("application/x-dmg-boxed",)
    growth: ClassVar[float] = 1.4  # base64 of base64
    in_worker: ClassVar[bool] = False

    def seal(self, header: MailHeader, content: bytes, keys: SealKeys) -> bytes:
        mail = formats.get("smime").seal(header, content, keys)
        head = mime.header_lines(
            [
                *mailformat.outer_headers(header),
                ("Content-Type", "application/x-dmg-boxed"),
                ("Content-Transfer-Encoding", "base64"),
            ]
        )
        return bytes(mime.b64_lines(bytes(mail), prefix=head + mime.CRLF))

    def seal_receipt(self, report: bytes, keys: SealKeys) -> bytes:
        return formats.get("smime").seal_receipt(report, keys)

    def can_open(self, partner: PartnerKeys, pgp: PgpOpener | None) -> bool:
        return bool(partner.certs)

    def open(self, raw: bytes, partner: PartnerKeys, me: Identity, pgp: PgpOpener | None) -> bytes:
        _, body = mime.split_entity(raw)
        return formats.get("smime").open(mime.decode_b64_strict(body), partner, me, pgp)

    def open_signed(self, entity: bytes, partner: PartnerKeys, pgp: PgpOpener | None) -> bytes:
        return formats.get("smime").open_signed(entity, partner, pgp)


@pytest.fixture
def boxed() -> Iterator[None]:
    formats.register(
        BoxedFormat()
    )  # the one line of registration (an in-tree format lists its module instead)
    yield
    formats.unregister("boxed")


def _datasets(paths: list[Path]) -> dict[str, bytes]:
    out = {}
    for p in paths:
        ds = dcmread(p)
        out[str(ds.SOPInstanceUID)] = ds.PixelData
    return out


@pytest.mark.asyncio
@pytest.mark.parametrize("fmt", ["smime", "smime-zip", "pgp", "boxed"])
async def test_a_study_reaches_the_partner_and_the_receipt_comes_back(
    fmt: str, boxed: None, pair_factory, tmp_path: Path, fake_mail: fakemail.FakeMail
) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory(f'format = "{fmt}"')
    study = make_study(tmp_path / "study", ct=3, mr=2, sc=1, size=64)
    await pair.send_study(study[0].parent)

    assert await pair.a_sends() >= 1
    assert fake_mail.boxes.count("gateway-b@dicommail.test") >= 1
    if fmt == "boxed":
        _, raw = fake_mail.boxes.snapshot("gateway-b@dicommail.test")[0]
        assert b"Content-Type: application/x-dmg-boxed" in raw  # the new format is what went on the wire
    assert await pair.b_receives_and_answers() >= 1

    stored_at_b = [pair.b.storage.root / p for p in await pair.b.catalog.instance_paths(purged=False)]
    assert _datasets(stored_at_b) == _datasets(study)  # every instance, every pixel
    assert fake_mail.boxes.count("gateway-a@dicommail.test") == 1  # B's receipt

    assert await pair.a_takes_the_receipt() == 1
    [transfer] = (await pair.a.catalog.status())["transfers"]
    assert (transfer["state"], transfer["receipt"]) == ("sent", "confirmed"), transfer
    # the receipt proves what B received (the digest of the signed content) and holds (every instance's bytes)
    assert (transfer["proof"], transfer["chain"]) == (
        "verified",
        ["contents verified", "stored at partner (no PACS)"],
    )
    [inbound] = (await pair.b.catalog.status())["transfers"]
    assert (inbound["direction"], inbound["state"], inbound["instances"]) == ("in", "complete", len(study))
    assert fake_mail.boxes.count("gateway-a@dicommail.test") == 0  # fetched and deleted
    assert fake_mail.boxes.count("gateway-b@dicommail.test") == 0
    assert not list(pair.b.storage.tmp.iterdir())  # every instance's temp file was placed or removed


@pytest.mark.asyncio
async def test_an_opened_mail_reaches_the_gateway_as_files_not_bytes(pair_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """S/MIME is opened in a worker process, which also writes the instances out: what comes back into the
    gateway's process is file names and digests (a few hundred bytes), not the decrypted instances."""
    import hashlib

    from gateway.core.queue import QueueState
    from gateway.spool import read_head
    from gateway.stages.workers import Unpacked

    pair = await pair_factory()
    study = make_study(tmp_path / "study", ct=3, size=64)
    await pair.send_study(study[0].parent)
    assert await pair.a_sends() == 1
    assert await pair.b.fetcher.poll_once() == 1
    [item] = pair.b.inbox.items(QueueState.INCOMING)
    got = await pair.b.ingester.unpack(read_head(item.content), item.content)
    assert isinstance(got, Unpacked) and got.accepted.parts == []
    by_uid = {str(dcmread(p).SOPInstanceUID): p.read_bytes() for p in study}
    for info, temp, sha256, size in got.files:
        assert temp.parent == pair.b.storage.tmp and temp.read_bytes() == by_uid[info.sop_instance_uid]
        assert (sha256, size) == (hashlib.sha256(temp.read_bytes()).hexdigest(), temp.stat().st_size)
    assert len(got.files) == len(study)


@pytest.mark.asyncio
async def test_an_unknown_format_is_a_configuration_error_naming_the_registered_ones(
    tmp_path: Path, pki_dir: Path, fake_mail: fakemail.FakeMail
) -> None:
    with pytest.raises(config.ConfigError) as refused:
        fastgw.fast_settings(tmp_path, pki_dir, fake_mail, "gateway-a", "gateway-b", 'format = "boxed"')
    assert "format" in str(refused.value) and "smime or smime-zip or pgp" in str(refused.value)


def test_registering_a_second_format_under_a_taken_name_is_refused(boxed: None) -> None:
    class Impostor(BoxedFormat):
        pass

    with pytest.raises(ValueError, match="already registered"):
        formats.register(Impostor())
    assert formats.names() == ("smime", "smime-zip", "pgp", "boxed")
    assert formats.for_content_type("application/x-dmg-boxed") is formats.get("boxed")


@pytest.mark.asyncio
async def test_mails_opened_side_by_side_are_stored_once_each_and_the_set_completes_once(
    pair_factory, tmp_path: Path, fake_mail: fakemail.FakeMail
) -> None:  # type: ignore[no-untyped-def]
    """B opens as many mails at once as it has workers; storing, duplicates and refusals stay one mail at a time:
    a study in several mails, one of them delivered twice, and a forged mail in between all end as they would one
    after the other (every instance once, the re-delivery a duplicate, the forgery held, the set complete)."""
    from gateway.core.queue import QueueState

    pair = await pair_factory('max_mail_size = "160KB"')
    assert pair.b.ingester.workers is not None  # the gateway's worker processes open the mails
    study = make_study(tmp_path / "study", ct=6, mr=2, size=64)
    await pair.send_study(study[0].parent)
    sent = await pair.a_sends()
    assert sent >= 3
    box = "gateway-b@dicommail.test"
    _, again = fake_mail.boxes.snapshot(box)[1]
    fake_mail.boxes.deliver(box, b"Received: from relay-2.dicommail.test\r\n" + again)  # one part twice
    fake_mail.boxes.deliver(box, again.replace(b"\r\nFrom: gateway-a@", b"\r\nFrom: intruder@", 1))
    assert await pair.b.fetcher.poll_once() == sent + 2
    assert await pair.b.ingester.run_once() == sent + 2
    stored = [pair.b.storage.root / p for p in await pair.b.catalog.instance_paths(purged=False)]
    assert _datasets(stored) == _datasets(study)
    [inbound] = (await pair.b.catalog.status())["transfers"]
    assert (inbound["state"], inbound["instances"]) == ("complete", len(study))
    outcomes = sorted(i.meta.get("outcome", "") for i in pair.b.inbox.items(QueueState.DONE))
    assert outcomes == sorted(["ingested"] * sent + ["duplicate"]), outcomes
    assert len(pair.b.inbox.items(QueueState.HOLD)) == 1
    assert not list(pair.b.storage.tmp.iterdir())


async def test_a_second_packaging_of_a_transfer_never_fails_the_mails_the_first_queued(
    pair_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a cluster a node that lost the packaging role while paused may package a transfer the node that took over
    has packaged already. Its attempt is passed by (the transfer is no longer pending), or, if it got past that
    look, fails without failing the transfer: the first set's mails go out, the transfer becomes sent, the partner
    gets the study once, and a restart's start-up check finds nothing wrong."""
    from gateway.core.states import TransferState
    from gateway.reconcile import catalog_from_queues

    pair = await pair_factory()
    study = make_study(tmp_path / "study", ct=2, mr=1, sc=0, size=32)
    await pair.send_study(study[0].parent)
    [listed] = await pair.a.catalog.transfers_in_state("out", TransferState.PENDING)
    tid = str(listed["id"])
    assert await pair.a.packager.package_listed(listed)
    assert (await pair.a.catalog.transfer(tid))["state"] == "packaged"

    assert await pair.a.packager.package_listed(listed), "the stale listing: passed by"
    # the injected fault: the look at the transfer's state came before the other node recorded its set
    real = pair.a.catalog.transfer

    async def stale(transfer_id: str):  # type: ignore[no-untyped-def]
        found = await real(transfer_id)
        return None if found is None else {**found, "state": "pending"}

    monkeypatch.setattr(pair.a.catalog, "transfer", stale)
    assert await pair.a.packager.package_listed(listed)
    monkeypatch.undo()
    assert (await pair.a.catalog.transfer(tid))["state"] == "packaged", "not failed by the second attempt"

    assert await pair.a.sender.run_once() >= 1
    assert (await pair.a.catalog.transfer(tid))["state"] == "sent"
    assert await pair.b_receives_and_answers() >= 1
    assert sorted(await pair.b.catalog.instance_paths(purged=False)).__len__() == len(study)
    assert await catalog_from_queues(pair.a.outbox, pair.a.inbox, pair.a.catalog) == 0


async def test_a_queue_the_catalog_disagrees_with_never_stops_a_start(pair_factory, tmp_path: Path) -> None:
    """A sent mail whose transfer the catalog holds as failed (an illegal move): the start-up check says so in the
    log and goes on, instead of a gateway that cannot start (and sends nothing) over one mail's record."""
    from gateway.core.queue import QueueState
    from gateway.reconcile import catalog_from_queues

    pair = await pair_factory()
    study = make_study(tmp_path / "study", ct=1, mr=0, sc=0, size=32)
    listed, item = await pair.a_packages(study[0].parent)
    active = pair.a.outbox.move(item, QueueState.ACTIVE)
    pair.a.outbox.move(active, QueueState.DONE)  # sent, and the gateway killed before the catalog heard of it
    await pair.a.catalog.db.execute("UPDATE transfers SET state = 'failed' WHERE id = ?", (listed["id"],))
    assert await catalog_from_queues(pair.a.outbox, pair.a.inbox, pair.a.catalog) == 0
    assert await pair.a.catalog.mail_state(str(item.meta["message_id"])) == "queued", (
        "left as it was, and said"
    )
