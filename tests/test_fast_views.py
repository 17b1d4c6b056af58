"""The fast tier, continued: what operators see and do, on two whole in-process gateways (see `tests/fastgw.py`).

- `status`, the web page and check_mk render one read model (`gateway.status`): they tell the same story;
- the web page's login, basic auth and CSRF checks;
- a hostile mail is quarantined, and the operator releases or discards it (CLI actions and web forms);
- fragments (`split = "partial"`) are reassembled, in any order;
- a dead SMTP node is failed over, and a study waits (deferred) while every node is down.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway import cli, monitoring, status
from gateway.core.audit import check
from gateway.core.states import TransferState
from gateway.devtools.studies import make_study
from gateway.operator import OperatorActions
from gateway.web import WebApp
from tests import fakemail
from tests.ports import free_port

PASSWORD = "fast-tier-operator"
B = "gateway-b@dicommail.test"
A = "gateway-a@dicommail.test"


@pytest.fixture(autouse=True)
def web_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMG_WEB_PASSWORD", PASSWORD)


def _basic() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"operator:{PASSWORD}".encode()).decode()}


async def _client(gw: object) -> TestClient:  # type: ignore[type-arg]
    client = TestClient(TestServer(WebApp(gw).app))  # type: ignore[arg-type]
    await client.start_server()
    return client


async def _flow(pair, tmp_path: Path) -> list[Path]:  # type: ignore[no-untyped-def]
    study = make_study(tmp_path / "study", ct=2, mr=1, sc=0, size=32)
    await pair.send_study(study[0].parent)
    assert await pair.a_sends() >= 1
    assert await pair.b_receives_and_answers() >= 1
    assert await pair.a_takes_the_receipt() == 1
    return study


@pytest.mark.asyncio
async def test_status_the_web_page_and_check_mk_tell_the_same_story(pair_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory()
    await _flow(pair, tmp_path)
    a = pair.a
    monitoring.write_health(
        a.settings, {**a.status(), "heartbeat": time.time()}
    )  # as the running gateway does

    view = await status.read(a.settings, live=monitoring.read_health(a.settings))
    [transfer] = view.catalog["transfers"]
    tid = transfer["id"]
    assert (transfer["state"], transfer["receipt"]) == ("sent", "confirmed")

    text = cli.status_text(a.settings, view)
    assert re.search(rf"{tid[-32:]}\s+out\s+gateway-b\s+sent .*confirmed", text), text
    assert (
        "smtp  127.0.0.1:" in text and "FAILING" not in text
    )  # the node that took the mail, from health.json

    services = {s.name: s for s in await monitoring.collect(a.settings)}
    assert services["DMG Receipts"].text.startswith("1 confirmed")
    smtp = [s for n, s in services.items() if n.startswith("DMG Mail node") and n.endswith("SMTP")]
    assert len(smtp) == 1 and smtp[0].state == monitoring.OK

    client = await _client(a)
    try:
        page = await (await client.get("/", headers=_basic())).text()
    finally:
        await client.close()
    row = re.search(rf"<tr class='[^']*'><td>{tid}</td>.*?</tr>", page)
    assert row and "sent" in row.group(0) and "confirmed" in row.group(0)
    assert "<td>SMTP</td>" in page


@pytest.mark.asyncio
async def test_the_web_page_asks_for_a_login_and_a_csrf_token(pair_factory) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory()
    client = await _client(pair.a)
    try:
        first = await client.get("/", allow_redirects=False)
        assert first.status == 303 and first.headers["Location"] == "/login"
        assert (await client.get("/metrics")).status == 401
        assert (await client.get("/healthz")).status in (200, 503)  # open: says ok or not, nothing else
        wrong = await client.post(
            "/login", data={"user": "operator", "password": "guess"}, allow_redirects=False
        )
        assert wrong.status == 401
        assert (await client.get("/", headers=_basic())).status == 200
        # a form post without the session's token is refused, even with valid credentials
        refused = await client.post("/queue/discard/nothing", data={"csrf": "forged"}, headers=_basic())
        assert refused.status == 403
        ok = await client.post(
            "/login", data={"user": "operator", "password": PASSWORD}, allow_redirects=False
        )
        assert ok.status == 303 and "HttpOnly" in ok.headers["Set-Cookie"]
        page = await (await client.get("/")).text()  # the session cookie is enough now
        assert "Quarantine" in page
    finally:
        await client.close()


def _hostile(to: str, sender: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: DICOM-eMail\r\nMessage-ID: <hostile.1@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nTm90IENNUyBhdCBhbGw=\r\n"
    ).encode()


@pytest.mark.asyncio
async def test_a_quarantined_mail_is_released_or_discarded_by_the_operator(
    pair_factory, fake_mail: fakemail.FakeMail
) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory()
    b = pair.b
    fake_mail.boxes.deliver(B, _hostile(B, A))  # claims to come from the partner; is no S/MIME at all
    assert await b.fetcher.poll_once() == 1
    await b.ingester.run_once()
    view = await status.read(b.settings, b.catalog)
    [held] = view.held
    assert held.queue == "inbox" and held.state == "hold" and "decrypt" in held.reason

    actions = OperatorActions(b.settings, b.storage, b.catalog, b.ctx.audit)
    await actions.release(held.id, "test")  # checked again: still hostile, so held again
    await b.ingester.run_once()
    [again] = (await status.read(b.settings, b.catalog)).held
    assert again.id == held.id and again.state == "hold"

    client = await _client(b)
    try:
        page = await (await client.get("/", headers=_basic())).text()
        token = re.search(r"name='csrf' value='([^']+)'", page)
        assert token and held.id in page
        gone = await client.post(
            f"/queue/discard/{held.id}",
            data={"csrf": token.group(1)},
            headers=_basic(),
            allow_redirects=False,
        )
        assert gone.status == 303
    finally:
        await client.close()
    after = await status.read(b.settings, b.catalog)
    assert after.held == [] and any(
        m["state"] == "discarded" for m in after.catalog["mails_by_state"] if m["direction"] == "in"
    )
    # the audit trail has the refusal at the trust boundary and each operator action, with who did it
    trail = b.ctx.audit.trail
    texts = [r.xml for d in trail.days() for r in trail.records(d)]
    holds = [t for t in texts if "Security Alert" in t and "Node Authentication" in t and held.id in t]
    assert len(holds) == 2, "held twice: on arrival and after the release"
    assert any(
        "Use of Restricted Function" in t and 'UserID="test"' in t and f"release {held.id}" in t
        for t in texts
    )
    assert any('UserID="web:operator"' in t and f"discard {held.id}" in t for t in texts)
    assert all(check(t) == [] for t in texts) and all(trail.verify(d)[0] for d in trail.days())


@pytest.mark.asyncio
async def test_fragments_are_reassembled_in_any_order(
    pair_factory, tmp_path: Path, fake_mail: fakemail.FakeMail
) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory('split = "partial"\nmax_mail_size = "64KB"\nmax_message_size = "2MB"')
    study = make_study(tmp_path / "study", ct=3, mr=0, sc=0, size=128)
    await pair.send_study(study[0].parent)
    assert await pair.a_sends() >= 2  # one message, cut into fragments of 64 KB
    box = fake_mail.boxes.boxes[B]
    box.reverse()  # the mail servers deliver them in any order
    fragments = len(box)
    assert fragments >= 2 and await pair.b_receives_and_answers() == fragments
    stored = await pair.b.catalog.instance_paths(purged=False)
    assert len(stored) == len(study)
    assert await pair.a_takes_the_receipt() == 1
    [transfer] = (await pair.a.catalog.status())["transfers"]
    assert transfer["receipt"] == "confirmed"


@pytest.mark.asyncio
async def test_a_dead_smtp_node_is_failed_over_and_a_study_waits_while_all_are_down(
    pair_factory, tmp_path: Path, fake_mail: fakemail.FakeMail
) -> None:  # type: ignore[no-untyped-def]
    dead = f"127.0.0.1:{free_port()}"  # configured, but nothing answers there
    pair = await pair_factory(a_smtp=[dead, *fake_mail.smtp_nodes])
    a = pair.a
    dead_node = a.settings.mail.smtp_nodes[0]
    study = make_study(tmp_path / "study", ct=1, mr=0, sc=0, size=16)
    await pair.send_study(study[0].parent)
    assert await pair.a_sends() == 1
    assert fake_mail.boxes.count(B) == 1  # through the node that answers
    assert a.sender.smtp.pool.health[dead_node].failures >= 1

    fake_mail.smtp.stop()  # now every node is down
    await pair.send_study(study[0].parent)
    assert await pair.a_sends() == 1  # tried, and deferred
    deferred = (await status.read(a.settings, a.catalog)).queues["outbox"]
    assert deferred.counts.get("deferred", 0) == 1 and fake_mail.boxes.count(B) == 1
    pending = await a.catalog.transfers_in_state("out", TransferState.PACKAGED)
    assert len(pending) == 1  # waiting, not failed
