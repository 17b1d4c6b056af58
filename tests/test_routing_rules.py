"""Routing rules as an operator writes them: the pure decision (`gateway.core.routing`), the configuration that
refuses what cannot work, and the route stage over a real catalog and stored files (fast tier)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pydicom
import pytest

from gateway import config
from gateway.catalog import InstanceRecord, open_catalog
from gateway.core.dicominfo import read_info
from gateway.core.routing import Facts, Hours, Pattern
from gateway.core.states import TransferState
from gateway.devtools import pki
from gateway.devtools.studies import make_study
from gateway.errors import ConfigError
from gateway.stages.route import Router, explain
from gateway.storage import Storage
from tests.conftest import stage_context, write_config

NIGHT = dt.datetime(2026, 12, 5, 23, 30)  # a Saturday
DAY = dt.datetime(2026, 12, 7, 10, 0)  # a Monday

RULES = """
[routing]
[[routing.rules]]
name = "night CT to b"
to = ["gateway-b"]
calling_ae = ["CT*"]
source = ["10.1.0.0/16"]
attributes = { Modality = "CT" }
hours = "18:00-07:30"
[[routing.rules]]
name = "head to b and c"
to = ["gateway-b", "gateway-c"]
attributes = { StudyDescription = "re:(?i).*sch(ä|ae)del.*" }
exclude = [{ ImageType = "*LOCALIZER*" }]
[[routing.rules]]
name = "tests stay"
to = []
attributes = { StudyDescription = "TEST*" }
stop = true
"""

C_PARTNER = """
[[partners]]
name = "gateway-c"
address = "{addr}"
smime_cert = "{pki}/gateway-c-smime.pem"
ae_title = "TO_C"
exclude = [{{ Modality = "SR" }}]
"""


def settings(tmp_path: Path, pki_dir: Path, rules: str = RULES) -> config.Settings:
    return config.load(
        write_config(
            tmp_path, pki_dir, C_PARTNER.format(pki=pki_dir, addr=pki.address_of("gateway-c")) + rules
        )
    )


def stored(
    storage: Storage,
    paths: list[Path],
    received_at: float,
    called: str | None = None,
    peer: str | None = None,
) -> list[InstanceRecord]:
    """Copy DICOM files into storage as a modality's C-STORE would (calling AE CT1), and their records."""
    records = []
    for p in paths:
        info = read_info(p)
        r = storage.store_copy(p, info)
        records.append(
            InstanceRecord(
                info,
                storage.relative(r.path),
                r.size,
                r.sha256,
                "dicom",
                "CT1",
                None,
                received_at,
                called_ae=called,
                peer=peer,
            )
        )
    return records


def facts(calling: str = "CT1", called: str = "GATEWAY_A", peer: str = "10.1.2.3", **attrs: str) -> Facts:
    return Facts(calling, called, peer, attrs)


def test_patterns_exact_wildcard_and_regex() -> None:
    assert Pattern("CT").matches(" ct ") and not Pattern("CT").matches("CTX")
    assert Pattern("CT*").matches("ct_room2") and Pattern("?R").matches("MR")
    assert Pattern("*LOCALIZER*").matches("ORIGINAL\\PRIMARY\\LOCALIZER")
    assert Pattern("re:CT|MR").matches("MR") and not Pattern("re:CT|MR").matches("mr")
    assert Pattern("re:(?i)ct|mr").matches("MR") and not Pattern("re:C").matches("CT"), (
        "regex: the whole value"
    )
    assert Pattern("[x]*").matches("[x]abc") and not Pattern("[x]*").matches("xabc"), "brackets are literal"
    assert Hours.parse("18:00-07:30").holds(23 * 60) and Hours.parse("18:00-07:30").holds(60)
    assert not Hours.parse("18:00-07:30").holds(12 * 60) and Hours.parse("08:00-17:00").holds(8 * 60)


def test_rules_in_order_union_exclusions_and_stop(tmp_path: Path, pki_dir: Path) -> None:
    rules = settings(tmp_path, pki_dir).routing
    head_ct = {
        "Modality": "CT",
        "StudyDescription": "CT Schädel nativ",
        "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
    }
    # at night from a CT in the network: both rules, b once (the first rule that chose it is recorded)
    d = rules.decide(facts(**head_ct), NIGHT)
    assert d.partners == {"gateway-b": "night CT to b", "gateway-c": "head to b and c"}
    # by day the first rule does not hold; the second still sends to both
    d = rules.decide(facts(**head_ct), DAY)
    assert d.partners == {"gateway-b": "head to b and c", "gateway-c": "head to b and c"}
    assert d.trace[0].reason == "arrived at 10:00, outside 18:00-07:30"
    # a scout of the same study: the rule's exclusion leaves it out of the head rule's partners
    scout = {**head_ct, "ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"}
    d = rules.decide(facts(peer="192.168.0.9", **scout), NIGHT)
    assert d.partners == {} and d.trace[0].reason == "source 192.168.0.9 is not in 10.1.0.0/16"
    assert ("gateway-b", "rule exclusion 1") in d.trace[1].excluded
    # gateway-c's own exclusion: no dose report goes there, whichever rule matched
    d = rules.decide(facts(**{"Modality": "SR", "StudyDescription": "Schädel"}), DAY)
    assert d.partners == {"gateway-b": "head to b and c"}
    assert d.trace[1].excluded == (("gateway-c", "partner exclusion 1"),)
    # a stop rule with no partners ends the evaluation: the built-in called-AE rule after it is not reached
    d = rules.decide(facts(called="TO_B", **{"Modality": "MR", "StudyDescription": "Test phantom"}), DAY)
    assert d.partners == {} and d.trace[-1].rule == "tests stay" and d.trace[-1].stopped
    # without the stop rule's match, the called-AE rule (after the configured ones) routes as it always did
    d = rules.decide(facts(called="TO_B", **{"Modality": "MR", "StudyDescription": "Knie"}), DAY)
    assert d.partners == {"gateway-b": "called AE title TO_B"}


def test_patient_attributes_are_matched_but_never_shown(tmp_path: Path, pki_dir: Path) -> None:
    rule = """
[routing]
[[routing.rules]]
name = "one patient"
to = ["gateway-c"]
attributes = { PatientID = "VIP-*" }
"""
    rules = settings(tmp_path, pki_dir, rule).routing
    assert rules.decide(facts(PatientID="VIP-7"), DAY).partners == {"gateway-c": "one patient"}
    reason = rules.decide(facts(PatientID="CANARY-4711"), DAY).trace[0].reason
    assert reason is not None and "CANARY" not in reason and "PatientID (value not shown)" in reason


@pytest.mark.parametrize(
    ("rule", "key", "says"),
    [
        ('to = ["nobody"]', "to", "no partner named 'nobody'"),
        ("to = []", "to", "stop = true"),
        ('to = ["gateway-b"]\nattributes = { Modalty = "CT" }', "attributes", "not a DICOM keyword"),
        (
            'to = ["gateway-b"]\nattributes = { Modality = "re:(" }',
            "attributes",
            "invalid regular expression",
        ),
        ('to = ["gateway-b"]\nhours = "18-7"', "hours", "HH:MM-HH:MM"),
        ('to = ["gateway-b"]\ndays = ["monday"]', "days", "mon, tue"),
        ('to = ["gateway-b"]\nsource = ["10.1.0.0/33"]', "source", "not a network"),
        ('to = ["gateway-b"]\ncalled = "X"', "called", "unknown key"),
    ],
)
def test_a_rule_that_cannot_work_is_refused_naming_its_key(
    tmp_path: Path, pki_dir: Path, rule: str, key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        settings(tmp_path, pki_dir, f"[routing]\n[[routing.rules]]\nname = 'r'\n{rule}\n")
    assert f"routing.rules[0].{key}" in str(err.value) and says in str(err.value), str(err.value)


async def test_the_route_stage_decides_each_new_instance_once_and_explains_it(
    tmp_path: Path, pki_dir: Path
) -> None:
    """Over a real catalog and stored files: a study whose scouts one partner does not get, a test study that
    stays, `route --explain` for both, and a late instance routed in a round of its own."""
    s = settings(tmp_path, pki_dir)
    folder = tmp_path / "head"
    paths = make_study(folder, ct=4, mr=0, sc=0, size=16)
    for n, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.StudyDescription = "CT Schaedel"
        if n == 0:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(p)
    tests = make_study(tmp_path / "test", ct=0, mr=2, sc=0, size=16)
    for p in tests:
        ds = pydicom.dcmread(p)
        ds.StudyDescription = "TEST phantom"
        ds.save_as(p)
    storage = Storage(s.d_root)
    storage.prepare()
    catalog = await open_catalog(s.database_url)
    try:
        records = stored(storage, paths + tests, 1000.0, "TO_C", "10.9.9.9")
        await catalog.record_instances(records)
        router = Router(stage_context(s, storage, catalog))
        now = time.time()
        assert await router.run_once(now) == 0, "received long ago, but first seen now: not stable yet"
        later = now + s.stability_delay
        assert await router.run_once(later) == 2  # one transfer each for b and c
        head, test = read_info(paths[0]).study_uid, read_info(tests[0]).study_uid
        routes = await catalog.routes_of(head)
        scout = read_info(paths[0]).sop_instance_uid
        # the head rule leaves the scout out (its exclusion); the called-AE rule for TO_C after it still sends it
        assert routes[scout] == {"gateway-c": ("called AE title TO_C", routes[scout]["gateway-c"][1])}
        assert all(set(v) == {"gateway-b", "gateway-c"} for k, v in routes.items() if k != scout)
        assert await catalog.routes_of(test) == {}, "the test study stays here"
        assert await router.run_once(later + 1) == 0, "decided once"

        text = "\n".join(await explain(s.routing, catalog, s.d_root, head))
        assert "rule 2 'head to b and c' → gateway-b, gateway-c" in text
        assert "not to gateway-b (rule exclusion 1)" in text
        assert "no match: calling AE CT1" not in text and "source 10.9.9.9 is not in 10.1.0.0/16" in text
        assert "decided on arrival: gateway-b 3 (rule 'head to b and c'" in text
        text = "\n".join(await explain(s.routing, catalog, s.d_root, test))
        assert "match; stop: later rules not evaluated" in text and "2 stay here" in text
        assert "decided on arrival: to no partner" in text
        assert "rule 5 'called AE title TO_C' → gateway-c\n  not evaluated (an earlier rule stopped)" in text
    finally:
        await catalog.close()


async def test_a_study_indexed_late_in_batches_leaves_in_one_transfer(tmp_path: Path, pki_dir: Path) -> None:
    """Instances received long ago but indexed late (the catalog was away; a Galera member stalled its commits),
    in two batches: the study is not stable until the router has seen its count unchanged for `stability_delay`,
    nor while this node's intake still holds some of it, so it leaves in one transfer, not two."""
    s = settings(tmp_path, pki_dir, "")
    paths = make_study(tmp_path / "s", ct=5, mr=2, sc=0, size=16)
    storage = Storage(s.d_root)
    storage.prepare()
    catalog = await open_catalog(s.database_url)
    try:
        records = stored(storage, paths, 1000.0, "TO_B")
        study = records[0].info.study_uid
        router = Router(stage_context(s, storage, catalog))

        async def sizes() -> list[int]:
            pending = await catalog.transfers_in_state("out", TransferState.PENDING)
            return sorted([len(await catalog.transfer_instances(t["id"])) for t in pending])

        delay = s.stability_delay
        now = time.time()
        await catalog.record_instances(records[:1])  # the first batch
        assert await router.run_once(now) == 0
        await catalog.record_instances(records[1:])  # the rest, a moment before the delay is over
        assert await router.run_once(now + delay) == 0, "the count changed: quiet only from now on"
        assert await router.run_once(now + 2 * delay) == 1
        assert await sizes() == [len(paths)], "the whole study in one transfer"

        # more of the same study from the modality: some of it still in this node's intake
        more = make_study(tmp_path / "more", ct=3, mr=0, sc=0, size=16, seed=2)
        for p in more:
            ds = pydicom.dcmread(p)
            ds.StudyInstanceUID = study
            ds.save_as(p)
        late = stored(storage, more, 2000.0, "TO_B")
        await catalog.record_instances(late[:2])
        router.waiting = lambda: {study}
        t = now + 3 * delay
        assert await router.run_once(t) == 0 and await router.run_once(t + 2 * delay) == 0, (
            "waits for the intake"
        )
        await catalog.record_instances(late[2:])
        router.waiting = frozenset
        assert await router.run_once(t + 3 * delay) == 0, "the count changed when the last one was indexed"
        assert await router.run_once(t + 4 * delay) == 1
        assert await sizes() == [3, len(paths)], "the late instances in one transfer of their own"
    finally:
        await catalog.close()


async def test_the_intake_tells_the_router_what_it_has_not_indexed_yet(tmp_path: Path, pki_dir: Path) -> None:
    """The router's `waiting` is the intake's: a study stays waiting while a batch of it cannot be indexed (the
    catalog away), and is free once the batch is in."""
    import asyncio

    from gateway.stages.receive import Intake, record_to_json

    s = settings(tmp_path, pki_dir, "")
    paths = make_study(tmp_path / "s", ct=2, mr=0, sc=0, size=16)
    storage = Storage(s.d_root)
    storage.prepare()
    catalog = await open_catalog(s.database_url)
    intake = Intake(storage, catalog, asyncio.Event())
    intake.guard.base = intake.guard.cap = 0.01
    real, away = catalog.record_instances, asyncio.Event()

    async def flaky(records):  # type: ignore[no-untyped-def]
        if not away.is_set():
            raise ConnectionRefusedError("the catalog is away")
        return await real(records)

    catalog.record_instances = flaky  # type: ignore[method-assign]
    indexer = asyncio.create_task(intake.index_forever())
    try:
        for rec in stored(storage, paths, 1000.0):
            intake.reported("r0", {"t": "stored", "r": record_to_json(rec), "o": "stored"})
        study = read_info(paths[0]).study_uid
        deadline = time.monotonic() + 10
        while intake.guard.failures < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert intake.guard.failures >= 3, "the batch was tried and failed"
        assert intake.waiting_studies() == {study}, "not indexed: waiting"
        away.set()
        deadline = time.monotonic() + 10
        while intake.waiting_studies() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert intake.waiting_studies() == set(), "indexed: no longer waiting"
        assert await catalog.unrouted_studies() == [(study, 2, 1000.0)]
    finally:
        indexer.cancel()
        await asyncio.gather(indexer, return_exceptions=True)
        await catalog.close()
