"""The on-disk queues: states as directories, the transition table, crash recovery, poison items."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.core.queue import MAX_CRASHES, IllegalMove, QueueState
from gateway.spool import Spool
from tests.conftest import minimal_settings, stage_context


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "inbox", tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    s.prepare()
    return s


def test_states_are_directories_and_moves_follow_the_table(spool):  # type: ignore[no-untyped-def]
    item = spool.put("m1", b"mail", {"size": 4})
    assert item.path.parent.name == "incoming" and item.content.read_bytes() == b"mail"
    assert spool.put("m1", b"other", {}).content.read_bytes() == b"mail", "put is idempotent"
    active = spool.move(item, QueueState.ACTIVE)
    with pytest.raises(IllegalMove):
        spool.move(active, QueueState.ACTIVE)
    done = spool.move(active, QueueState.DONE, drop_content=True, outcome="ingested")
    assert (
        done.path.parent.name == "done" and not done.content.exists() and done.meta["outcome"] == "ingested"
    )
    with pytest.raises(IllegalMove):
        spool.move(done, QueueState.INCOMING)
    assert spool.prune_done(3600, float(done.meta["state_since"]) + 10) == 0
    assert spool.prune_done(3600, float(done.meta["state_since"]) + 4000) == 1
    assert spool.counts() == {"incoming": 0, "active": 0, "deferred": 0, "hold": 0, "corrupt": 0, "done": 0}


def test_deferred_items_wait_until_due(spool):  # type: ignore[no-untyped-def]
    item = spool.move(spool.put("m1", b"x", {}), QueueState.ACTIVE)
    spool.move(item, QueueState.DEFERRED, next_attempt=1000.0)
    assert spool.due(999.0) == []
    assert [i.id for i in spool.due(1000.0)] == ["m1"]
    assert spool.next_due() == 1000.0


def test_crashed_items_are_requeued_then_set_aside(spool):  # type: ignore[no-untyped-def]
    spool.put("poison", b"x", {})
    for crash in range(1, MAX_CRASHES + 1):
        item = spool.find("poison")
        assert item is not None and item.state is QueueState.INCOMING
        spool.move(item, QueueState.ACTIVE)  # ...and the gateway dies here
        [recovered] = spool.recover()
        assert recovered.meta["crashes"] == crash
    assert recovered.state is QueueState.CORRUPT, "no crash loop: set aside after MAX_CRASHES"
    assert "stopped" in recovered.meta["reason"] and recovered.content.exists()
    assert spool.due(1e12) == []


async def test_an_unexpected_error_sets_the_mail_aside_with_its_traceback(tmp_path, pki_dir):  # type: ignore[no-untyped-def]
    from gateway.catalog import open_catalog
    from gateway.core.smime import Identity
    from gateway.stages.ingest import Ingester
    from gateway.storage import Storage

    settings = minimal_settings(
        tmp_path, pki_dir, pki_dir / "gateway-b-smime.pem", pki_dir / "gateway-b-smime.key"
    )
    storage = Storage(settings.d_root)
    storage.prepare()
    inbox = Spool(storage.inbox, storage.tmp)
    inbox.prepare()
    catalog = await open_catalog(settings.database_url)
    try:
        me = Identity.load(settings.smime_cert.read_bytes(), settings.smime_key.read_bytes())
        ingester = Ingester(stage_context(settings, storage, catalog, me, inbox))

        def broken(*_args: object) -> None:  # an injected bug in the gate
            raise ZeroDivisionError("injected")

        import gateway.stages.ingest as ingest_module

        original = ingest_module.inbound.inspect_mail
        ingest_module.inbound.inspect_mail = broken  # type: ignore[assignment]
        try:
            inbox.put("m1", b"From: x@y\r\n\r\nx", {})
            await ingester.run_once()
        finally:
            ingest_module.inbound.inspect_mail = original
        item = inbox.find("m1")
        assert item is not None and item.state is QueueState.CORRUPT
        assert "ZeroDivisionError" in item.meta["traceback"] and item.content.exists()
        row = await catalog.db.fetchone("SELECT state, error FROM mails WHERE id = 'm1'")
        assert row == ("quarantined", "internal error: ZeroDivisionError")
    finally:
        await catalog.close()


async def test_a_slow_pacs_holds_a_receipt_no_longer_than_the_deadline(tmp_path, pki_dir):  # type: ignore[no-untyped-def]
    """A receipt waits for the PACS's answers; past `mail.receipt_pacs_deadline` it goes as a warning that says
    how many instances are still unanswered, and a refusal is named beside them."""
    from gateway.catalog import open_catalog
    from gateway.core import mdn
    from gateway.core.smime import Identity
    from gateway.stages.receipts import Receipts
    from gateway.storage import Storage

    settings = minimal_settings(
        tmp_path,
        pki_dir,
        pki_dir / "gateway-b-smime.pem",
        pki_dir / "gateway-b-smime.key",
        pacs=[{"name": "slow", "host": "127.0.0.1", "port": 1, "ae_title": "SLOW"}],
    )
    storage = Storage(settings.d_root)
    storage.prepare()
    catalog = await open_catalog(settings.database_url)
    try:
        me = Identity.load(settings.smime_cert.read_bytes(), settings.smime_key.read_bytes())
        stage = Receipts(stage_context(settings, storage, catalog, me))
        deadline = settings.mail.receipt_pacs_deadline
        now = time.time()
        sops = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
        await catalog.queue_forwards(sops, ["slow"], now)
        await catalog.record_forward("1.2.3.1", "slow", "accepted", 1, now, status=0)
        await catalog.record_forward(
            "1.2.3.2", "slow", "rejected", 5, now, status=0xA700, error="PACS answered 0xA700"
        )
        await catalog.queue_receipt_out(
            "fresh", "a", "a@x", "<m1@x>", mdn.OK, "", now, sop_uids=sops, wait_for_pacs=True
        )
        await catalog.queue_receipt_out(
            "old", "a", "a@x", "<m2@x>", mdn.OK, "", now - deadline - 1, sop_uids=sops, wait_for_pacs=True
        )
        assert await stage.settle_waiting() == 1
        rows = {r["id"]: r for r in await catalog.receipts_out(("due", "waiting"))}
        assert rows["fresh"]["state"] == "waiting", "within the deadline the receipt waits for the PACS"
        assert rows["old"]["state"] == "due" and rows["old"]["outcome"] == mdn.WARNING
        assert rows["old"]["detail"] == (
            "stored; the PACS refused 1 of 3 instances; the PACS has not yet answered for 1 of 3 instances"
        )
        await catalog.record_forward("1.2.3.3", "slow", "accepted", 1, now, status=0)
        assert await stage.settle_waiting() == 1
        rows = {r["id"]: r for r in await catalog.receipts_out(("due",))}
        assert rows["fresh"]["detail"] == "stored; the PACS refused 1 of 3 instances"
    finally:
        await catalog.close()
