"""The pure core, storage, configuration and the catalog on both backends (SQLite and the real MariaDB)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config
from gateway.catalog import MIGRATIONS, Catalog, InstanceRecord, open_catalog
from gateway.catalog.db import connect
from gateway.core import mailformat, mime, smime
from gateway.core.dicominfo import InstanceInfo, NotDicomError, read_info
from gateway.core.nodepool import NodePool
from gateway.core.states import IllegalTransition, MailState, TransferState, check_transfer, retry_delay
from gateway.devtools.studies import make_study
from gateway.errors import ConfigError
from gateway.storage import Storage, StoreOutcome
from tests.conftest import stage_context, write_config


# ------------------------------------------------------------------------------------------ configuration
def write_cfg(tmp_path: Path, pki_dir: Path, **kw: object) -> Path:
    return write_config(tmp_path, pki_dir, **kw)


def test_config_loads_and_routes(tmp_path, pki_dir):  # type: ignore[no-untyped-def]
    s = config.load(write_cfg(tmp_path, pki_dir))
    assert s.partner_by_ae("TO_B").name == "gateway-b"  # type: ignore[union-attr]
    assert s.partner_by_ae("OTHER") is None
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("catalog.sqlite")
    assert len(s.mail.smtp_nodes) == 6 and s.mail.smtp_nodes[0].port == 25


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda t: t.replace('ae_title = "GW_A"\n', ""), "gateway.ae_title"),
        (lambda t: t.replace("poll_interval = 2", "poll_intervall = 2"), "mail.poll_intervall"),
        (lambda t: t.replace('max_mail_size = "20MB"', 'max_mail_size = "huge"'), "mail.max_mail_size"),
        (lambda t: t.replace('ae_title = "TO_B"', 'ae_title = "BAD\\\\AE"'), "partners[0].ae_title"),
        (lambda t: t.replace("gateway-b-smime.pem", "missing.pem"), "partners[0].smime_cert"),
        (lambda t: t.replace("dicom_port = 11112", 'dicom_port = "x"'), "gateway.dicom_port"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, pki_dir, edit, key):  # type: ignore[no-untyped-def]
    p = write_cfg(tmp_path, pki_dir)
    p.write_text(edit(p.read_text()))
    with pytest.raises(ConfigError) as err:
        config.load(p)
    assert err.value.key == key
    assert str(p) in str(err.value)


def test_example_configuration_is_valid_and_documents_every_key(tmp_path):  # type: ignore[no-untyped-def]
    text = (Path(__file__).parents[1] / "gateway.example.toml").read_text()
    import tomllib

    data = tomllib.loads(text)
    assert {"gateway", "storage", "database", "mail", "smime", "partners", "backup", "monitoring"} <= set(
        data
    )
    # every key the loader reads (found in its source, so a new key cannot be forgotten) appears in the example,
    # set or commented out
    import ast
    import re

    from gateway import config

    trees = [ast.parse(p.read_text()) for p in Path(config.__file__).parent.glob("*.py")]
    keys = set(config.MonitoringSettings.__dataclass_fields__)
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if called in ("get", "path", "table_of", "nodes", "parse_size_key"):
                keys |= {
                    a.value for a in node.args[:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)
                }
    assert {"smtp_nodes", "pgp_fingerprint", "compression", "imap_nodes"} <= keys  # the scan itself works
    for key in sorted(keys):
        assert re.search(rf"^\s*#?\s*(\[+{key}\]+|{key}\s*=)", text, re.M), f"{key} is not in the example"


# ------------------------------------------------------------------------------------------ mail format
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=400_000), min_size=1, max_size=60),
    st.integers(min_value=64 * 1024, max_value=4 * 1024 * 1024),
)
def test_split_plan_never_exceeds_the_cap_and_keeps_order(sizes, cap):  # type: ignore[no-untyped-def]
    try:
        plan = mailformat.plan_mails(sizes, cap)
    except mailformat.MailFormatError:
        assert max(sizes) > mailformat.payload_capacity(cap)
        return
    assert [i for mail in plan for i in mail] == list(range(len(sizes)))
    for mail in plan:
        assert mailformat.estimate_mail_size([sizes[i] for i in mail]) <= cap


def test_built_mails_respect_the_estimate_and_round_trip(tmp_path, pki_dir):  # type: ignore[no-untyped-def]
    a = smime.Identity.load(
        (pki_dir / "gateway-a-smime.pem").read_bytes(), (pki_dir / "gateway-a-smime.key").read_bytes()
    )
    b = smime.Identity.load(
        (pki_dir / "gateway-b-smime.pem").read_bytes(), (pki_dir / "gateway-b-smime.key").read_bytes()
    )
    parts = [p.read_bytes() for p in make_study(tmp_path / "s", ct=5, mr=4, sc=2, size=64)]
    h = mailformat.MailHeader(
        "gateway-a@dicommail.test",
        "gateway-b@dicommail.test",
        "DICOM-eMail",
        "<m@x>",
        "set9",
        2,
        3,
        "1.2.3.4",
        time.time(),
    )
    data = mailformat.build_mail(h, parts, a, b.cert)
    assert len(data) <= mailformat.estimate_mail_size([len(p) for p in parts])
    assert b"1.2.3.4" not in data, "the study UID travels only inside the encryption"
    opened = mailformat.open_mail(data, b, [a.cert])
    assert opened.parts == parts and (opened.set_id, opened.part, opened.total, opened.study_uid) == (
        "set9",
        2,
        3,
        "1.2.3.4",
    )
    with pytest.raises(smime.SmimeError, match="address book"):
        mailformat.open_mail(data, b, [b.cert])
    with pytest.raises(smime.SmimeError, match="decrypt"):
        mailformat.open_mail(data, a, [a.cert])
    # a signed content altered after signing (re-encrypted by an attacker who knows B's certificate) fails
    signed = mailformat.build_signed(mailformat.build_inner(h, parts), a)
    tampered = signed.replace(b"IM000001.dcm", b"IM000009.dcm", 1)
    forged = data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + mime.b64_lines(smime.encrypt(tampered, [b.cert]))
    with pytest.raises(smime.SmimeError, match="altered"):
        mailformat.open_mail(forged, b, [a.cert])


def test_plain_mail_is_not_accepted(pki_dir):  # type: ignore[no-untyped-def]
    b = smime.Identity.load(
        (pki_dir / "gateway-b-smime.pem").read_bytes(), (pki_dir / "gateway-b-smime.key").read_bytes()
    )
    with pytest.raises(mailformat.MailFormatError, match="not encrypted"):
        mailformat.open_mail(b"From: x@y\r\nContent-Type: text/plain\r\n\r\nhello\r\n", b, [])


# ------------------------------------------------------------------------------------------ DICOM, storage
def test_read_info_and_refusals(tmp_path):  # type: ignore[no-untyped-def]
    src = make_study(tmp_path / "s", ct=1, mr=0, sc=0)[0]
    info = read_info(src)
    assert info.modality == "CT" and info.transfer_syntax == "1.2.840.10008.1.2.1"
    with pytest.raises(NotDicomError):
        read_info(b"\x00" * 300)
    with pytest.raises(NotDicomError):
        read_info(src.read_bytes()[:200])


def test_storage_deduplicates_and_keeps_conflicts_aside(tmp_path):  # type: ignore[no-untyped-def]
    src = make_study(tmp_path / "s", ct=1, mr=0, sc=0)[0]
    storage = Storage(tmp_path / "d")
    storage.prepare()
    data = src.read_bytes()
    info = read_info(data)
    first = storage.store_bytes(data, info)
    assert first.outcome is StoreOutcome.STORED and first.path.read_bytes() == data
    assert storage.store_bytes(data, info).outcome is StoreOutcome.DUPLICATE
    other = data[:-2] + b"\x01\x02"
    conflict = storage.store_bytes(other, info)
    assert conflict.outcome is StoreOutcome.CONFLICT and conflict.path.parent == storage.conflicts
    assert first.path.read_bytes() == data, "the stored instance is never overwritten"
    assert list(storage.tmp.iterdir()) == []
    hostile = InstanceInfo("1.2", "../../etc/passwd", "..", "a/b", "1.2.840.10008.1.2.1", "CT", None)
    assert storage.images in storage.instance_path(hostile).parents


def _place_at_once(args: tuple[str, int, int, int]) -> list[str]:
    """Store `count` UIDs (this process's own content for each) starting at `start_ns`; the outcomes in order."""
    root, me, count, start_ns = args
    storage = Storage(Path(root))
    temps = []
    for n in range(count):
        tmp = storage.tmp / f"race-{me}-{n}"
        tmp.write_bytes(bytes([me]) * 64)
        temps.append(tmp)
    while time.time_ns() < start_ns:  # both processes go at the same moment, UID by UID
        pass
    out = []
    for n, tmp in enumerate(temps):
        info = InstanceInfo(
            "1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{n}", "1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1", "CT", 1
        )
        out.append(storage._place(info, tmp, hashlib.sha256(bytes([me]) * 64).hexdigest(), 64).outcome.value)
    return out


def test_processes_storing_one_uid_together_keep_exactly_one(tmp_path):  # type: ignore[no-untyped-def]
    """Receivers are processes: of two copies of one UID stored at once, one is stored and the other is kept
    aside as a conflict; neither overwrites the other unseen."""
    import multiprocessing

    storage = Storage(tmp_path / "d")
    storage.prepare()
    count = 400
    start = time.time_ns() + 500_000_000
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        first, second = pool.map(_place_at_once, [(str(storage.root), me, count, start) for me in (1, 2)])
    for n, pair in enumerate(zip(first, second, strict=True)):
        assert sorted(pair) == ["conflict", "stored"], f"UID {n}: {pair}"
    assert len(list(storage.conflicts.iterdir())) == count


# ------------------------------------------------------------------------------------------ states, nodes
def test_transition_table_refuses_illegal_moves():  # type: ignore[no-untyped-def]
    check_transfer(TransferState.PENDING, TransferState.PACKAGED)
    with pytest.raises(IllegalTransition):
        check_transfer(TransferState.SENT, TransferState.PENDING)
    assert retry_delay(1) == 30 and retry_delay(3) == 120 and retry_delay(20) == 300


def test_node_pool_round_robin_and_cooldown():  # type: ignore[no-untyped-def]
    pool = NodePool(("n1", "n2", "n3"), cooldown=60)
    assert pool.order(0)[0] == "n1" and pool.order(0)[0] == "n2"
    pool.failed("n3", 0, "refused")
    assert pool.order(1) == ["n1", "n2", "n3"]  # n3 rests, tried last
    assert pool.order(100)[0] == "n1" and pool.order(100)[0] == "n2"
    assert pool.order(100)[0] == "n3"  # cool-down over: n3 leads again in its turn


# ------------------------------------------------------------------------------------------ catalog, both backends
@pytest.fixture(params=["sqlite", "mariadb"])
def catalog_url(request, tmp_path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'c.sqlite'}"
    return request.getfixturevalue("mariadb_url")


async def test_catalog_behaves_the_same_on_both_backends(catalog_url, tmp_path):  # type: ignore[no-untyped-def]
    cat = await open_catalog(catalog_url)
    try:
        assert await cat.migrate() == len(MIGRATIONS)  # idempotent
        infos = [read_info(p) for p in make_study(tmp_path / "s", ct=3, mr=2, sc=0, size=32)]
        recs = [
            InstanceRecord(
                i, f"images/{i.sop_instance_uid}", 100, "0" * 64, "dicom", "MOD", "gateway-b", 1000.0
            )
            for i in infos
        ]
        assert await cat.record_instances(recs) == 5
        assert await cat.record_instances(recs) == 0, "indexing is idempotent"
        study = infos[0].study_uid
        assert await cat.unrouted_studies() == [(study, 5, 1000.0)], "five instances waiting for routing"
        waiting = await cat.routable(study, unrouted_only=True)
        assert {i.sop_uid for i in waiting} == {i.sop_instance_uid for i in infos}
        decisions = {i.sop_uid: {"gateway-b": "rule b"} for i in waiting}
        decisions[waiting[0].sop_uid] = {"gateway-b": "rule b", "gateway-c": "rule c"}
        assert await cat.record_routes(decisions, 1000.5) == 6
        assert await cat.record_routes(decisions, 1000.6) == 0, "a decision is stored once"
        many = {f"9.9.{n}": {"gateway-x": "bulk", "gateway-y": "bulk"} for n in range(450)}  # across chunks
        assert await cat.record_routes(many, 1000.7) == 900 and await cat.record_routes(many, 1000.8) == 0
        await cat.db.execute("DELETE FROM instance_routes WHERE rule_name = 'bulk'")
        assert await cat.unrouted_studies() == []
        assert sorted(await cat.pending_routes()) == [(study, "gateway-b"), (study, "gateway-c")]
        assert await cat.create_out_transfer("t1", "gateway-b", study, 1001.0) == 5
        assert await cat.create_out_transfer("t0", "gateway-c", study, 1001.0) == 1
        assert await cat.pending_routes() == []
        routes = await cat.routes_of(study)
        assert routes[waiting[0].sop_uid] == {"gateway-b": ("rule b", "t1"), "gateway-c": ("rule c", "t0")}
        await cat.add_out_mails("t1", [("<t1.1@x>", 1, 2, "p1", 10), ("<t1.2@x>", 2, 2, "p2", 10)], 1002.0)
        await cat.defer_mail("<t1.2@x>", 1, 5000.0, "421 busy", 1003.0)
        row = await cat.db.fetchone(
            "SELECT state, attempts, next_attempt, error FROM mails WHERE id = '<t1.2@x>'"
        )
        assert row == ("queued", 1, 5000.0, "421 busy")
        assert await cat.mark_mail_sent("<t1.1@x>", "n1", 1005.0) is False
        assert await cat.mark_mail_sent("<t1.2@x>", "n2", 1006.0) is True
        t = await cat.transfer("t1")
        assert t is not None and t["state"] == "sent" and t["parts_done"] == 2 and t["bytes"] == 500
        with pytest.raises(IllegalTransition):
            await cat.set_transfer_state("t1", TransferState.PACKAGED, 1007.0)
        assert (
            await cat.create_resend_transfer("t3", "gateway-c", study, [w.sop_uid for w in waiting], 1007.5)
            == 5
        )
        assert len(await cat.pending_routes()) == 0, "a re-send leaves routing decisions alone"
        # an instance already sent can be sent again by hand (a resend, or to another partner)
        assert await cat.enqueue_manual(recs[:2], "t2", "gateway-c", 1008.0) == 2
        assert {sop for sop, _, _ in await cat.transfer_instances("t2")} == {
            r.info.sop_instance_uid for r in recs[:2]
        }
        assert len(await cat.transfer_instances("t1")) == 5
        # inbound: parts in any order, re-delivery recognised
        for key in ("m2", "m1"):
            assert await cat.record_in_mail(key, f"spool/inbox/{key}.eml", 10, 1.0)
        assert not await cat.record_in_mail("m1", "spool/inbox/m1.eml", 10, 1.0)
        assert (
            await cat.finish_in_mail(
                "m2", MailState.INGESTED, 2.0, transfer_id="a:s", partner="a", part=2, total=2, instances=3
            )
            is False
        )
        assert await cat.in_part_done("a:s", 2) and not await cat.in_part_done("a:s", 1)
        assert (
            await cat.finish_in_mail(
                "m1", MailState.INGESTED, 3.0, transfer_id="a:s", partner="a", part=1, total=2, instances=2
            )
            is True
        )
        st = await cat.status()
        inbound = next(x for x in st["transfers"] if x["direction"] == "in")
        assert inbound["state"] == "complete" and inbound["instances"] == 5
    finally:
        await cat.close()


async def test_schema_upgrades_from_version_one(catalog_url, monkeypatch):  # type: ignore[no-untyped-def]
    import gateway.catalog as catalog_module

    monkeypatch.setattr(catalog_module, "MIGRATIONS", MIGRATIONS[:1])  # an installation of the first release
    old = Catalog(await connect(catalog_url))
    assert await old.migrate() == 1
    await old.db.execute(
        "INSERT INTO transfers (id, direction, partner, state, created_at, updated_at) VALUES ('t', 'out', 'p', 'sent', 1, 1)"
    )
    await old.close()
    monkeypatch.setattr(catalog_module, "MIGRATIONS", MIGRATIONS)
    new = await open_catalog(catalog_url)
    try:
        assert (await new.db.fetchone("SELECT version FROM schema_version")) == (len(MIGRATIONS),)
        assert await new.db.fetchone("SELECT COUNT(*) FROM pacs_forwards") == (0,)
        assert await new.transfer("t") is not None, "data survives the upgrade"
    finally:
        await new.close()


async def test_space_is_freed_only_after_every_pacs_accepted(catalog_url, tmp_path, pki_dir):  # type: ignore[no-untyped-def]
    from gateway.audit import AuditTrail
    from gateway.auditing import Auditor
    from gateway.devtools.studies import CANARY_ID
    from gateway.stages.forward import purge_accepted
    from tests.conftest import minimal_settings

    pacs = [{"name": n, "host": "127.0.0.1", "port": 104, "ae_title": "PACS"} for n in ("p1", "p2")]
    settings = minimal_settings(
        tmp_path,
        pki_dir,
        pki_dir / "gateway-b-smime.pem",
        pki_dir / "gateway-b-smime.key",
        pacs=pacs,
        database={"url": catalog_url},
    )
    storage = Storage(settings.d_root)
    storage.prepare()
    cat = await open_catalog(catalog_url)
    try:
        recs = []
        sources = make_study(tmp_path / "s", ct=2, mr=0, sc=0, size=16)
        for src in sources:
            info = read_info(src)
            result = storage.store_bytes(src.read_bytes(), info)
            recs.append(
                InstanceRecord(
                    info, storage.relative(result.path), result.size, result.sha256, "mail", "b", None, 0.0
                )
            )
        await cat.record_instances(recs)
        sops = [r.info.sop_instance_uid for r in recs]
        await cat.queue_forwards(sops, ["p1", "p2"], 0.0)
        for sop in sops:
            await cat.record_forward(sop, "p1", "accepted", 1, 100.0, status=0)
        await cat.record_forward(sops[0], "p2", "accepted", 1, 100.0, status=0)
        await cat.record_forward(sops[1], "p2", "retry", 1, 100.0, status=0xA700, next_attempt=200.0)
        audit = Auditor(AuditTrail(settings.e_root / "audit", settings.name), settings, storage.root)
        assert await purge_accepted(settings, storage, cat, 100.0 + 6 * 86400, audit) == 0, "kept for 7 days"
        assert await purge_accepted(settings, storage, cat, 100.0 + 8 * 86400, audit) == 1, (
            "only where every PACS accepted"
        )
        # the audit trail names what went, with the patient read from the file before it was removed
        [gone] = [r.xml for d in audit.trail.days() for r in audit.trail.records(d)]
        assert "DICOM Study Deleted" in gone and 'EventActionCode="D"' in gone and CANARY_ID in gone
        assert 'NumberOfInstances="1"' in gone
        assert not (settings.d_root / recs[0].path).exists() and (settings.d_root / recs[1].path).exists()
        assert (await cat.db.fetchone("SELECT purged_at FROM instances WHERE sop_uid = ?", (sops[0],)))[
            0
        ] is not None  # type: ignore[index]
        # the same instance arriving again is stored and indexed again
        again = storage.store_bytes(sources[0].read_bytes(), recs[0].info)
        await cat.record_instances([recs[0]])
        assert again.path.exists()
        assert await cat.db.fetchone("SELECT purged_at FROM instances WHERE sop_uid = ?", (sops[0],)) == (
            None,
        )
    finally:
        await cat.close()


def test_mails_we_build_skip_aiosmtplibs_whole_message_rewrites(pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    """Our mails need no line-end or dot-stuffing rewrite, so the event loop does not scan them; others still get it."""
    from aiosmtplib import protocol
    from aiosmtplib import smtp as aiosmtplib_smtp

    from gateway.adapters import smtp

    # the hooks are in place wherever aiosmtplib rewrites a whole message
    assert protocol.normalize_message_line_endings is smtp._normalize_unless_ready
    assert aiosmtplib_smtp.normalize_message_line_endings is smtp._normalize_unless_ready
    assert protocol.SMTPProtocol.execute_data_command is smtp._execute_data_in_pieces
    a = smime.Identity.load(
        (pki_dir / "gateway-a-smime.pem").read_bytes(), (pki_dir / "gateway-a-smime.key").read_bytes()
    )
    parts = [p.read_bytes() for p in make_study(tmp_path / "s", ct=2, mr=0, sc=0, size=32)]
    h = mailformat.MailHeader(
        "a@dicommail.test", "b@dicommail.test", "DICOM-eMail", "<m@x>", "s", 1, 1, "1.2", 0.0
    )
    mail = mailformat.build_mail(h, parts, a, a.cert)
    ready = smtp.prepare(bytes(mail))
    assert isinstance(ready, smtp.WireReady) and ready == mail and smtp.wire_ready(mail)
    assert isinstance(smtp.prepare(bytes(mail), known_ready=True), smtp.WireReady)  # the packager checked it
    assert protocol.PERIOD_REGEX.sub(b"..", protocol.normalize_message_line_endings(ready)) is ready
    for raw in (b"Subject: x\n.hidden\r\nend", b"Subject: x\r\n\r\n.\r\n", b"no line end"):
        assert not isinstance(smtp.prepare(raw), smtp.WireReady) and not smtp.wire_ready(raw)
    other = smtp.prepare(b"Subject: x\n.hidden\r\nend")
    assert protocol.PERIOD_REGEX.sub(b"..", protocol.normalize_message_line_endings(other)) == (
        b"Subject: x\r\n..hidden\r\nend\r\n"
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000))
def test_base64_both_ways_matches_the_standard(data):  # type: ignore[no-untyped-def]
    import base64

    encoded = mime.b64_lines(data)
    assert encoded == base64.encodebytes(data).replace(b"\n", b"\r\n")
    assert mime.b64_decode(encoded) == data


def test_base64_decoder_refuses_what_is_not_base64():  # type: ignore[no-untyped-def]
    import binascii

    for bad in (b"abc", b"ab$d", b"a=bc", b"=abc", b"abcd" * 2000 + b"ab\x00d"):
        with pytest.raises(binascii.Error):
            mime.b64_decode(bad)
    big = bytes(range(256)) * 40000  # more than one 4 MB step of the decoder
    assert mime.b64_decode(mime.b64_lines(big)) == big
    step = 1 << 22
    padded_at_a_step_end = b"A" * (step - 4) + b"QQ==" + b"QUJD"  # valid on each side of the step boundary
    with pytest.raises(binascii.Error):
        mime.b64_decode(padded_at_a_step_end)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=1, max_size=3000), st.sampled_from(["crlf", "lf", "no-end", "blank", "space", "junk"])
)
def test_base64_in_any_layout_decodes_as_the_standard_does(data, layout):  # type: ignore[no-untyped-def]
    """The decoder's fast path (whole 76-character CRLF lines) and its general path agree with the standard
    library's strict decoder on every layout a mail may bring, good or bad."""
    import binascii

    encoded = bytes(mime.b64_lines(data))
    variant = {
        "crlf": encoded,
        "lf": encoded.replace(b"\r\n", b"\n"),
        "no-end": encoded[:-2],
        "blank": encoded[: len(encoded) // 2] + b"\r\n" + encoded[len(encoded) // 2 :],
        "space": encoded.replace(b"\r\n", b" \r\n", 1),
        "junk": encoded[:-2] + b"*\r\n",
    }[layout]
    try:
        expected: bytes | None = binascii.a2b_base64(variant.translate(None, b" \t\r\n"), strict_mode=True)
    except binascii.Error:
        expected = None
    try:
        got: bytes | None = mime.b64_decode(variant)
    except binascii.Error:
        got = None
    assert got == expected


async def test_loop_watch_takes_a_block_apart() -> None:
    """A callback that keeps the loop's thread busy shows as a block at least as long as it (less one interval),
    taken apart into parts that add up to the window measured. Only bounds that hold on a loaded machine."""
    import asyncio

    from gateway.loopwatch import LoopWatch

    async def ticks_past(n: int) -> None:  # the watch's next measurement, bounded
        for _ in range(1000):
            if watch.ticks > n:
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the loop watch stopped measuring")

    watch = LoopWatch()
    task = asyncio.create_task(watch.run_forever())
    await ticks_past(0)
    seen = watch.ticks
    busy_until = time.perf_counter() + 0.3
    while time.perf_counter() < busy_until:  # blocking code on the loop: no await for 300 ms
        pass
    await ticks_past(seen)
    task.cancel()
    # the measurement that spans the busy stretch began before it and was due 50 ms later: at least 250 ms late
    assert watch.max_block >= 0.3 - LoopWatch.INTERVAL, watch.max_block
    assert watch.blocks_over_100ms >= 1
    parts = watch.max_block_parts
    window = watch.max_block + LoopWatch.INTERVAL
    assert all(v >= 0 for v in parts.values()) and sum(parts.values()) <= window + 0.01, parts


def test_a_final_receipt_stands_and_a_contradiction_is_reported() -> None:
    from gateway.core.states import IllegalTransition, settle_receipt

    assert settle_receipt(None, "displayed") == ("displayed", False)
    assert settle_receipt("displayed", "displayed") == ("displayed", False)  # a replay
    assert settle_receipt("displayed", "deleted") == ("displayed", True)  # never "confirmed" → "failed"
    assert settle_receipt("deleted", "displayed") == ("deleted", True)  # nor the reverse
    assert settle_receipt("deleted/error", "displayed") == ("displayed", False)  # released at the partner
    assert settle_receipt("deleted/error", "deleted") == ("deleted", False)  # discarded at the partner
    with pytest.raises(IllegalTransition):
        settle_receipt(None, "confirmed")


def test_the_quota_drops_the_oldest_unauthenticated_bytes_first() -> None:
    from gateway.core.quota import Holding, plan_drops

    held = [Holding("mail", f"m{i}", "a@x", 10, float(i)) for i in range(5)]
    held += [Holding("fragments", f"g{i}", f"s{i}@y", 10, 10.0 + i) for i in range(3)]
    drops = plan_drops(held, total=60, per_sender=30)
    assert [h.ref for h in drops] == ["m0", "m1"]  # a@x is cut to 30 first; then all fit in 60
    drops = plan_drops(held, total=40, per_sender=30)
    assert [h.ref for h in drops] == ["m0", "m1", "m2", "m3"]  # then the oldest of the rest
    assert plan_drops(held, total=1000, per_sender=1000) == []


def test_headers_from_outside_are_unfolded_and_checked() -> None:
    from gateway.core import mailformat
    from gateway.logsetup import scrub

    raw = b"From: Partner\r\n <p@x.test>\r\nMessage-ID:\r\n <a.1@x.test>\r\nSubject: s\r\n\r\nbody"
    outer = mailformat.read_outer(raw)
    assert outer.message_id == "<a.1@x.test>" and outer.sender == "p@x.test"
    assert mime.message_id_or_empty("<a b@x>") == ""
    assert mime.message_id_or_empty("<a@x>\r\nBcc: victim@y") == ""
    assert mime.address_or_empty("a@b@c") == ""
    assert "DOE" not in scrub("Invalid value for VR PN: 'DOE^JOHN'") and "VR PN" in scrub("VR PN: 'DOE^JOHN'")


def test_the_same_dataset_under_another_file_meta_is_the_same_instance(tmp_path: Path) -> None:
    """A modality's original file sent again by hand (`send`), wrapped by another toolkit: a duplicate, not a
    conflict. Another dataset under the same UID is still a conflict."""
    from gateway.adapters.dicom import file_meta
    from gateway.core.dicominfo import dataset_offset, read_info
    from gateway.devtools.studies import make_study
    from gateway.storage import Storage, StoreOutcome

    src = make_study(tmp_path / "s", ct=1, mr=0, sc=0)[0]
    data = src.read_bytes()
    info = read_info(src)
    rewrapped = (
        file_meta(info.sop_class_uid, info.sop_instance_uid, info.transfer_syntax)
        + data[dataset_offset(data) :]
    )
    assert rewrapped != data and rewrapped[dataset_offset(rewrapped) :] == data[dataset_offset(data) :]
    storage = Storage(tmp_path / "d")
    storage.prepare()
    assert storage.store_bytes(data, info).outcome is StoreOutcome.STORED
    assert storage.store_bytes(rewrapped, info).outcome is StoreOutcome.DUPLICATE
    assert not storage.conflicts.exists() or not any(storage.conflicts.iterdir())
    changed = data[:-2] + bytes([data[-2] ^ 1]) + data[-1:]
    assert storage.store_bytes(changed, info).outcome is StoreOutcome.CONFLICT
    assert storage.instance_path(info).read_bytes() == data, "the stored file stays as it was"


def test_thumbnails_decode_12_bit_jpeg_stay_square_and_never_log_an_error(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """JPEG Extended 12-bit (as DCMTK writes it) is decoded; a tall image stays inside its square box; pixel data
    that cannot be decoded gives a grey placeholder and one INFO line, no ERROR."""
    import io
    import logging
    import subprocess

    import numpy as np
    import pydicom
    from PIL import Image

    from gateway.imaging import thumbnail_png

    src = make_study(tmp_path / "s", ct=1, mr=0, sc=0, size=64)[0]
    jpeg12 = tmp_path / "jpeg12.dcm"
    subprocess.run(["dcmcjpeg", "+ee", str(src), str(jpeg12)], check=True, capture_output=True, timeout=60)
    tall = pydicom.dcmread(src)
    tall.Rows, tall.Columns = 64, 16
    tall.PixelData = np.arange(64 * 16, dtype=np.uint16).tobytes()
    tall.save_as(tmp_path / "tall.dcm", enforce_file_format=True)
    broken = pydicom.dcmread(src)
    broken.PixelData = b"\\0" * 10  # far too short for 64 × 64 pixels
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    with caplog.at_level(logging.DEBUG):
        images = {
            name: Image.open(io.BytesIO(thumbnail_png(str(tmp_path / f"{name}.dcm"))))
            for name in ("jpeg12", "tall", "broken")
        }
    assert all(im.size == (128, 128) for im in images.values())
    assert len(set(np.asarray(images["jpeg12"].convert("L")).ravel().tolist())) > 10, (
        "the image, not a placeholder"
    )
    left_edge = np.asarray(images["tall"].convert("L"))[:, :40]
    assert not left_edge.any(), "a tall image is centred in its box, black beside it"
    assert set(np.asarray(images["broken"]).ravel().tolist()) == {96}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in caplog.records if "no thumbnail" in r.getMessage()] == ["INFO"]


# ------------------------------------------------------------------------------------------ errors by kind
def test_errors_are_classified_once_by_kind() -> None:
    import sqlite3

    from gateway.errors import MailNodeError, QuarantineError, RejectedError
    from gateway.stages import Kind, kind_of

    assert kind_of(MailNodeError("n", "down")) is Kind.TRANSIENT
    assert kind_of(OSError(28, "No space left on device")) is Kind.TRANSIENT
    assert kind_of(sqlite3.OperationalError("database is locked")) is Kind.TRANSIENT
    assert kind_of(RejectedError("550")) is Kind.PERMANENT and kind_of(QuarantineError("x")) is Kind.PERMANENT
    assert kind_of(KeyError("x")) is Kind.BUG and kind_of(TypeError("x")) is Kind.BUG


def test_a_loop_backs_off_on_transient_errors_and_stops_on_a_repeated_bug() -> None:
    from gateway.stages import LoopGuard
    from gateway.stages.context import Progress

    progress = Progress()
    guard = LoopGuard("router", progress, base=1.0, cap=8.0)
    assert [guard.failed(OSError("catalog away")) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    guard.ok()
    delays = [guard.failed(TypeError("a bug")) for _ in range(LoopGuard.MAX_BUGS)]
    assert delays[:-1] == [1.0, 2.0, 4.0, 8.0] and delays[-1] is None  # stops instead of retrying forever
    assert "halted by a bug: TypeError" in progress.stalled(time.time(), 600)["router"]


async def test_a_stage_whose_turn_keeps_failing_with_a_bug_stops_and_says_so(tmp_path, pki_dir) -> None:  # type: ignore[no-untyped-def]
    """The router's loop, on a catalog that raises a bug every turn: it ends (bounded) and reports why."""
    import asyncio

    from gateway.catalog import open_catalog
    from gateway.stages.route import Router
    from gateway.storage import Storage

    settings = config.load(write_cfg(tmp_path, pki_dir))
    storage = Storage(settings.d_root)
    storage.prepare()
    catalog = await open_catalog(settings.database_url)
    try:
        ctx = stage_context(settings, storage, catalog)
        router = Router(ctx)
        router.guard.base = router.guard.cap = 0.001

        async def broken() -> list[tuple[str, int, float]]:
            raise TypeError("a bug in a query")

        catalog.unrouted_studies = broken  # type: ignore[method-assign]
        await asyncio.wait_for(router.run_forever(), 30)  # returns: it does not retry a bug forever
        assert "halted by a bug: TypeError" in ctx.progress.stalled(time.time(), 600)["router"]
    finally:
        await catalog.close()


def test_the_dicomweb_index_columns_are_the_schemas() -> None:
    """The index's columns are derived from the QIDO attributes (`core.qido.INDEXED`); the migration that made the
    table is history and cannot follow them, so this says when the two part."""
    import re

    from gateway.catalog.schema import MIGRATIONS
    from gateway.catalog.webindex import WEB_COLUMNS

    [table] = [sql for m in MIGRATIONS for sql in m if "CREATE TABLE web_index" in sql]
    columns = set(re.findall(r"^\s+(\w+) (?:VARCHAR|INTEGER|DOUBLE)", table, re.M))
    assert columns == set(WEB_COLUMNS) | {"indexed_at"}


def test_the_mailbox_is_polled_again_at_once_while_mails_come_and_backs_off_to_the_interval() -> None:
    from gateway.stages.fetch import QUIET_START, next_poll_in

    assert next_poll_in(3, 0, 10) == 0  # a poll that took mails: look again at once
    waits = [next_poll_in(0, quiet, 10) for quiet in range(1, 9)]  # then the mailbox runs empty
    assert waits == [0.25, 0.5, 1, 2, 4, 8, 10, 10]
    assert next_poll_in(0, QUIET_START + 1, 10) == 10  # an idle gateway after start-up: one poll per interval
    assert next_poll_in(0, 1, 0.1) == 0.1  # never later than the configured interval
