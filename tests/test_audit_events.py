"""The audit trail's events beyond a study's transfers (fast tier): receipts both ways, what an operator saw on the
web page (names and images), configuration changes seen at start-up, purges, a sent transfer whose event a crash
cut off, and the bound on what senders nobody authenticated can write to E:."""

from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.audit import AuditTrail
from gateway.auditing import DICOM_PER_ADDRESS, Auditor
from gateway.auditread import history
from gateway.core import audit as A
from gateway.devtools.studies import CANARY_ID, CANARY_NAME, make_study
from gateway.web import WebApp

PASSWORD = "audit-operator"


@pytest.fixture(autouse=True)
def web_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMG_WEB_PASSWORD", PASSWORD)


def texts(trail: AuditTrail) -> list[str]:
    return [r.xml for d in trail.days() for r in trail.records(d)]


def sound(trail: AuditTrail) -> bool:
    return all(A.check(t) == [] for t in texts(trail)) and all(trail.verify(d)[0] for d in trail.days())


@pytest.mark.asyncio
async def test_receipts_and_what_an_operator_saw_are_in_the_trail(pair_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory(web_extra="show_patient_data = true")
    study = make_study(tmp_path / "study", ct=2, mr=1, sc=0, size=32)
    await pair.send_study(study[0].parent)
    assert await pair.a_sends() >= 1
    assert await pair.b_receives_and_answers() >= 1
    assert await pair.a_takes_the_receipt() == 1
    a, b = pair.a, pair.b
    [begin] = [t for t in texts(a.ctx.audit.trail) if "Begin Transferring DICOM Instances" in t]
    assert "queued for partner gateway-b in 1 mails" in begin and CANARY_ID in begin
    sent = [t for t in texts(b.ctx.audit.trail) if "receipt sent to partner gateway-a" in t]
    got = [t for t in texts(a.ctx.audit.trail) if "receipt received from partner gateway-b" in t]
    for said in (sent, got):
        assert len(said) == 1 and CANARY_ID in said[0] and CANARY_NAME in said[0]
        assert ">displayed<" in said[0] and 'NumberOfInstances="' in said[0]

    # B's status page names the patient (web.show_patient_data) and shows the study's images
    client = TestClient(TestServer(WebApp(b).app))
    await client.start_server()
    auth = {"Authorization": "Basic " + base64.b64encode(f"operator:{PASSWORD}".encode()).decode()}
    try:
        page = await (await client.get("/", headers=auth)).text()
        assert CANARY_ID in page
        thumb = re.search(r"src='(/thumb/[^']+\.png)'", page)
        assert thumb is not None
        assert (await client.get(thumb.group(1), headers=auth)).status == 200
        access = b.settings.d_root / "state" / "access"
        assert await b.ctx.audit.access.round(access) == 1, "one view of one study by one user this hour"
        [seen] = [t for t in texts(b.ctx.audit.trail) if "DICOM Instances Accessed" in t]
        assert 'UserID="operator"' in seen and 'NetworkAccessPointID="127.0.0.1"' in seen
        assert CANARY_ID in seen and CANARY_NAME in seen and 'EventActionCode="R"' in seen
        # the page refreshes itself every ten seconds: the same view within the hour is not written again
        assert (await client.get("/", headers=auth)).status == 200
        assert await b.ctx.audit.access.round(access) == 0
    finally:
        await client.close()
    told = "\n".join(history(b.ctx.audit.trail, patient=CANARY_ID))
    for step in ("DICOM Instances Transferred [C]", "Receipt [R]", "DICOM Instances Accessed [R]"):
        assert step in told, told
    assert sound(a.ctx.audit.trail) and sound(b.ctx.audit.trail)


@pytest.mark.asyncio
async def test_configuration_changes_are_seen_at_start_up(pair_factory) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory()
    b = pair.b
    trail = b.ctx.audit.trail
    first = [t for t in texts(trail) if "Software Configuration" in t]
    assert any("partner gateway-a added" in t for t in first), "the first start records what is configured"
    assert await b.ctx.audit.configuration_seen(b.keys.book) == [], "nothing changed since"

    # the operator changes gateway-a's address and adds a partner; its certificate is another one now
    [partner] = b.settings.partners
    moved = dataclasses.replace(partner, addresses=("gateway-a@elsewhere.test",))
    other = dataclasses.replace(partner, name="gateway-c", addresses=("gateway-c@dicommail.test",))
    settings = dataclasses.replace(b.settings, partners=(moved, other))
    auditor = Auditor(trail, settings, b.storage.root)
    changes = await auditor.configuration_seen(None)
    assert "partner gateway-c added" in changes
    assert any(c.startswith("partner gateway-a: addresses changed") for c in changes)
    assert any(c.startswith("partner gateway-a: S/MIME certificate changed") for c in changes)
    recorded = [t for t in texts(trail) if "Software Configuration" in t]
    assert len(recorded) == len(first) + len(changes) and sound(trail)


@pytest.mark.asyncio
async def test_a_sent_transfer_whose_event_a_crash_cut_off_gets_it_at_start(
    pair_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory()
    a = pair.a
    make_study(tmp_path / "study", ct=2, mr=0, sc=0, size=16)
    await pair.send_study(tmp_path / "study")
    assert await pair.a_sends() >= 1
    trail = a.ctx.audit.trail
    sent = [r for d in trail.days() for r in trail.records(d) if r.key.startswith("out:")]
    assert len(sent) == 1
    # as if the gateway died between the catalog's "sent" and the event: a fresh trail lacks it
    fresh = Auditor(AuditTrail(tmp_path / "fresh-audit", a.settings.name), a.settings, a.storage.root)
    transfers = await a.catalog.sent_transfers_since(0)
    assert await fresh.catch_up_sent(transfers, a.catalog.transfer_audit_rows) == 1
    assert await fresh.catch_up_sent(transfers, a.catalog.transfer_audit_rows) == 0, "once"
    [again] = [r for d in fresh.trail.days() for r in fresh.trail.records(d)]
    assert again.key == sent[0].key and again.replay and CANARY_ID in again.xml
    assert await a.ctx.audit.catch_up_sent(transfers, a.catalog.transfer_audit_rows) == 0


@pytest.mark.asyncio
async def test_a_transfer_whose_last_mail_a_crash_kept_from_the_catalog_gets_its_event_at_start(
    pair_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Killed after the mail server took the last mail and the queue said so, before the catalog heard of it: the
    start-up reconciliation records the mail as sent, completing the transfer, and the trail gets its event."""
    from gateway.core.queue import QueueState
    from gateway.service import Gateway

    pair = await pair_factory()
    a = pair.a
    make_study(tmp_path / "study", ct=2, mr=0, sc=0, size=16)
    listed, item = await pair.a_packages(tmp_path / "study")
    a.outbox.move(a.outbox.move(item, QueueState.ACTIVE), QueueState.DONE, drop_content=True)
    settings = a.settings
    await a.close()  # the kill: the catalog still says queued, no event was written
    again = await Gateway.create(settings)
    try:
        assert await again.catalog.mail_state(str(item.meta["message_id"])) == "sent"
        trail = again.ctx.audit.trail
        [sent] = [
            r for d in trail.days() for r in trail.records(d) if r.key.startswith(f"out:{listed['id']}")
        ]
        assert sent.replay and "sent by mail to partner gateway-b" in sent.xml and CANARY_ID in sent.xml
        assert sound(trail)
    finally:
        await again.close()


@pytest.mark.asyncio
async def test_a_cluster_node_never_writes_again_what_another_node_wrote(
    pair_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The start-up catch-up on a cluster node looks into every node's chain on E: (a transfer is audited by the
    node that completed it), so a restart does not write the cluster's last day of transfers again."""
    from gateway.config import ClusterSettings

    pair = await pair_factory()
    a = pair.a
    make_study(tmp_path / "study", ct=2, mr=0, sc=0, size=16)
    await pair.send_study(tmp_path / "study")
    assert await pair.a_sends() >= 1

    def node(name: str) -> Auditor:
        settings = dataclasses.replace(a.settings, cluster=ClusterSettings(name))
        return Auditor(AuditTrail(settings.audit_dir, name), settings, a.storage.root)

    n1, n2 = node("n1"), node("n2")
    assert await n1.catch_up(a.catalog) == 1, "as if n1 had sent it and died before its event"
    assert await n2.catch_up(a.catalog) == 0, "n1's chain has it"
    assert await n1.catch_up(a.catalog) == 0


@pytest.mark.asyncio
async def test_a_flood_of_associations_costs_a_bounded_number_of_events(pair_factory) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory()
    auditor = pair.a.ctx.audit
    auditor.association("MODALITY", "TO_B", "10.1.1.1", True, "")
    auditor.association("", "", "10.1.1.2", False, "TLS handshake failed")
    for n in range(DICOM_PER_ADDRESS + 500):  # one address, an AE title each time
        auditor.association(f"X{n}", "TO_B", "10.6.6.6", False, f"calling AE title 'X{n}' not allowed")
    assert await auditor.flush() == 2 + DICOM_PER_ADDRESS + 1
    trail = auditor.trail
    all_texts = texts(trail)
    assert sum("Association Refused" in t and "10.6.6.6" in t for t in all_texts) == DICOM_PER_ADDRESS
    [summary] = [t for t in all_texts if "Events Not Recorded Singly" in t]
    assert "500 further refused DICOM associations from 1 senders" in summary and "sender 10.6.6.6" in summary
    [tls] = [t for t in all_texts if "10.1.1.2" in t]
    assert (
        "Node Authentication" in tls and "TLS handshake failed" in tls and 'EventOutcomeIndicator="4"' in tls
    )
    [ok] = [t for t in all_texts if "10.1.1.1" in t]
    assert "Association Accepted" in ok and 'AlternativeUserID="MODALITY"' in ok
    assert await auditor.flush() == 0 and sound(trail)


def test_the_budget_counts_per_sender_per_day_and_in_all() -> None:
    budget = A.Budget(per_sender=2, per_day=3)
    assert [budget.admit("x", "d1") for _ in range(3)] == [True, True, False]
    assert budget.admit("y", "d1") and not budget.admit("z", "d1"), "the day's total is reached"
    assert budget.take_suppressed() == {"x": 1, "z": 1} and budget.take_suppressed() == {}
    assert budget.admit("x", "d2"), "a new day, a new budget"
