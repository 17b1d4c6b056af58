"""The fast tier: receipts that prove content (`core.proof`), on two whole in-process gateways.

B's receipt names the digest of the signed content it received and, per instance, the SHA-256 of the file it holds
when the receipt is built. A checks both against what it sent: "contents verified"; an instance B holds with other
bytes (garbled on B's disk before the receipt) is "contents differ" with its UID, and check_mk is CRIT; a plain
RFC 3798 receipt, as an older partner sends it, still confirms, "not verified"; a partner's unreadable or lying
instance list never passes as proof.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway import cli, monitoring, status
from gateway.core import mdn
from gateway.devtools.studies import make_study
from gateway.stages import RECEIPT
from gateway.stages.receipts import receipt_item_id
from gateway.web import WebApp

PASSWORD = "fast-tier-operator"


@pytest.fixture(autouse=True)
def web_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMG_WEB_PASSWORD", PASSWORD)


async def _b_stores(pair, tmp_path: Path) -> list[Path]:  # type: ignore[no-untyped-def]
    study = make_study(tmp_path / "study", ct=2, mr=1, sc=0, size=32)
    await pair.send_study(study[0].parent)
    assert await pair.a_sends() >= 1
    assert await pair.b.fetcher.poll_once() >= 1
    assert await pair.b.ingester.run_once() >= 1
    return study


async def _b_answers(pair) -> None:  # type: ignore[no-untyped-def]
    await pair.b.receipts.queue_due()
    await pair.b.sender.run_once()
    assert await pair.a_takes_the_receipt() == 1


async def _page(gw) -> str:  # type: ignore[no-untyped-def]
    """The web page as the logged-in operator sees it."""
    client = TestClient(TestServer(WebApp(gw).app))
    await client.start_server()
    try:
        auth = base64.b64encode(f"operator:{PASSWORD}".encode()).decode()
        return html.unescape(await (await client.get("/", headers={"Authorization": "Basic " + auth})).text())
    finally:
        await client.close()


async def _a_view(pair):  # type: ignore[no-untyped-def]
    a = pair.a
    monitoring.write_health(a.settings, {**a.status(), "heartbeat": time.time()})
    view = await status.read(a.settings, live=monitoring.read_health(a.settings))
    [transfer] = view.catalog["transfers"]
    services = {s.name: s for s in await monitoring.collect(a.settings)}
    return transfer, cli.status_text(a.settings, view), services["DMG Receipts"]


@pytest.mark.asyncio
async def test_an_instance_garbled_at_the_partner_shows_as_contents_differ_and_check_mk_is_crit(
    pair_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory()
    await _b_stores(pair, tmp_path)
    rows = {
        str(r[0]): str(r[1]) for r in await pair.b.catalog.db.fetchall("SELECT sop_uid, path FROM instances")
    }
    victim = sorted(rows)[1]
    path = pair.b.storage.root / rows[victim]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one pixel byte: B's disk no longer holds what A sent
    path.write_bytes(bytes(data))
    await _b_answers(pair)

    transfer, text, receipts = await _a_view(pair)
    assert transfer["receipt"] == "confirmed"  # B said it stored the mail ...
    assert transfer["proof"] == "differs"  # ... and its digests say what it holds is not what we sent
    assert transfer["proof_detail"] == f"contents differ: 1 instances: {victim}"
    assert f"confirmed by partner, contents differ: 1 instances: {victim}" in text
    assert receipts.state == monitoring.CRIT and "1 with contents that differ" in receipts.text
    page = await _page(pair.a)
    row = re.search(rf"<tr class='([^']*)'><td>{transfer['id']}</td>.*?</tr>", page)
    assert row and row.group(1) == "bad" and f"contents differ: 1 instances: {victim}" in row.group(0)


@pytest.mark.asyncio
async def test_a_plain_rfc3798_receipt_from_an_older_partner_confirms_but_is_not_verified(
    pair_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pair = await pair_factory()
    await _b_stores(pair, tmp_path)
    # what an older gateway sends: the same signed MDN, without Received-Content-MIC and without the instance list
    [owed] = await pair.b.catalog.receipts_out(("due",))
    partner = pair.b.settings.partner_by_name("gateway-a")
    assert partner is not None
    plain = pair.b.receipts.build(partner, str(owed["to_addr"]), str(owed["original_message_id"]), mdn.OK, "")
    assert b"Received-Content-MIC" not in plain and b"stored-instances" not in plain
    meta = {
        "kind": RECEIPT,
        "partner": "gateway-a",
        "to": owed["to_addr"],
        "receipt": owed["id"],
        "attempts": 0,
    }
    pair.b.outbox.put(receipt_item_id(str(owed["id"])), plain, {**meta, "message_id": "plain"})
    await pair.b.catalog.set_receipt_out(str(owed["id"]), "queued", time.time())
    await pair.b.sender.run_once()
    assert await pair.a_takes_the_receipt() == 1

    transfer, text, receipts = await _a_view(pair)
    assert (transfer["receipt"], transfer["proof"]) == ("confirmed", "not-verified")
    assert "confirmed by partner (not verified)" in text
    assert receipts.state == monitoring.OK


def _receipt_with(stored: bytes) -> bytes:
    report = mdn.build_report(
        sender="b@x.test", original_message_id="<m@x>", outcome=mdn.OK, detail="", mic="AAAA", stored=[]
    )
    return report.replace(b'{"version":1,"instances":[\r\n\r\n]}', stored)


def test_a_partners_instance_list_is_read_field_by_field() -> None:
    """A partner's list is the partner's claim: anything malformed makes the receipt "not verified" with the
    reason, never a proof, and nothing of it reaches our pages unchecked."""
    good = mdn.Stored("1.2.3", "a" * 64, "committed")
    built = mdn.build_report(
        sender="b@x.test", original_message_id="<m@x>", outcome=mdn.OK, detail="", mic="q83v", stored=[good]
    )
    assert max(len(line) for line in built.split(b"\r\n")) < 998
    r = mdn.read_report(built)
    assert (r.mic, r.stored, r.unreadable) == ("q83v", (good,), "")

    for body, why in [
        (b"not json", "unreadable instance list"),
        (json.dumps({"version": 2, "instances": []}).encode(), "not a version 1 instance list"),
        (json.dumps({"version": 1, "instances": [{"uid": "1.2;rm", "sha256": None}]}).encode(), "valid uid"),
        (
            json.dumps({"version": 1, "instances": [{"uid": "1.2", "sha256": "XYZ"}]}).encode(),
            "64 lower-case",
        ),
        (
            json.dumps({"version": 1, "instances": [{"uid": "1.2", "sha256": None, "pacs": "<b>"}]}).encode(),
            "PACS",
        ),
    ]:
        r = mdn.read_report(_receipt_with(body))
        assert r.stored is None and why in r.unreadable, (body, r)

    from gateway.core.proof import DIFFERS, NOT_VERIFIED, VERIFIED, judge

    sent = {"1.2.3": "a" * 64, "1.2.4": "b" * 64}
    both = mdn.Receipt("<m@x>", mdn.OK, "", "mic", (good, mdn.Stored("1.2.4", "b" * 64, "stored")))
    assert judge("mic", sent, both).proof == VERIFIED
    assert judge("other", sent, both).proof == DIFFERS  # the partner received other content
    one_missing = mdn.Receipt("<m@x>", mdn.OK, "", "mic", (good,))
    v = judge("mic", sent, one_missing)
    assert (v.proof, v.instances["1.2.4"][1]) == (DIFFERS, "missing")
    assert judge("mic", sent, mdn.Receipt("<m@x>", mdn.OK, "")).proof == NOT_VERIFIED


def _pacs(port: int, ae: str, commitment: bool) -> str:
    return (
        f'[[pacs]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {port}\nae_title = "{ae}"\n'
        f"storage_commitment = {'true' if commitment else 'false'}\nmax_attempts = 2\nretry_base = 0.01\n"
        "timeout = 10\n"
    )


async def _b_forwards_until_final(pair) -> None:  # type: ignore[no-untyped-def]
    """B's forwarder until every forward has a final answer (bounded: two attempts of store and commit)."""
    for _ in range(20):
        await pair.b.forwarder.run_once(now=time.time() + 3600)  # retries fall due at once
        states = await pair.b.catalog.db.fetchall("SELECT DISTINCT state FROM pacs_forwards")
        if {str(s[0]) for s in states} <= {"accepted", "rejected"}:
            break
    await pair.b.receipts.settle_waiting()


@pytest.mark.asyncio
@pytest.mark.parametrize("commitment", [True, False])
async def test_the_sender_sees_what_the_partners_pacs_committed(
    commitment: bool, pair_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """B's PACS reports commitment on the same association and loses the MR instances after answering Success:
    A sees exactly those as not committed. A PACS without commitment: "stored (not committed)"."""
    from tests.faults import committing_pacs
    from tests.ports import free_port

    port = free_port()
    pair = await pair_factory(b_tail=_pacs(port, "COMMITTER", commitment))
    with committing_pacs(port, lose_modality="MR") as pacs:
        study = await _b_stores(pair, tmp_path)
        await _b_forwards_until_final(pair)
    await _b_answers(pair)
    transfer, text, receipts = await _a_view(pair)
    assert transfer["proof"] == "verified"
    if not commitment:
        assert transfer["receipt"] == "confirmed" and pacs["reported"] == []
        assert "confirmed by partner, contents verified; stored (not committed)" in text
        return
    mr = sorted(str(ds_uid) for ds_uid in _uids(study, "MR"))
    assert len(pacs["reported"]) == 2  # asked twice (max_attempts = 2), answered on the same association
    assert transfer["receipt"] == "warning"
    assert transfer["partner_pacs"] == {"committed": len(study) - len(mr), "not-committed": len(mr)}
    assert f"partner's PACS: {len(mr)} not-committed of {len(study)}" in text
    for uid in mr:
        assert f"{uid} (not-committed: not committed by the PACS: 0x0112 no such object instance)" in text
    assert receipts.state == monitoring.WARN


def _uids(study: list[Path], modality: str) -> list[str]:
    from pydicom import dcmread

    return [str(ds.SOPInstanceUID) for ds in (dcmread(p) for p in study) if ds.Modality == modality]
