"""Backup → wipe → restore on both catalog backends, damaged sets, retention, encrypted keys."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway import backup, catalog, config
from gateway.audit import AuditTrail
from gateway.catalog import InstanceRecord, open_catalog
from gateway.core.audit import EXPORT, AuditEvent, Participant
from gateway.core.dicominfo import read_info
from gateway.core.states import MailState
from gateway.devtools import orthanc as orthanc_peer
from gateway.devtools.process import GatewayProcess
from gateway.devtools.studies import make_study
from tests.conftest import storescu, wait_for, write_config
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def write_settings(tmp_path: Path, pki_dir: Path, url: str | None, extra: str = "") -> config.Settings:
    return config.load(write_config(tmp_path, pki_dir, extra, database_url=url))


async def populate(url: str, tmp_path: Path) -> None:
    cat = await open_catalog(url)
    try:
        infos = [read_info(p) for p in make_study(tmp_path / "s", ct=3, mr=2, sc=1, size=16)]
        recs = [
            InstanceRecord(
                i,
                f"images/{i.sop_instance_uid}.dcm",
                4000 + n,
                f"{n:064x}",
                "dicom",
                "CT1",
                "gateway-b",
                1000.5 + n,
            )
            for n, i in enumerate(infos)
        ]
        await cat.record_instances(recs)
        await cat.create_out_transfer("t1", "gateway-b", infos[0].study_uid, 1010.25)
        await cat.add_out_mails(
            "t1",
            [
                ("<t1.1@x>", 1, 2, "spool/outbox/t1.00001", 10),
                ("<t1.2@x>", 2, 2, "spool/outbox/t1.00002", 11),
            ],
            1011.0,
        )
        await cat.mark_mail_sent("<t1.1@x>", "127.0.0.11:25", 1012.0)
        await cat.defer_mail("<t1.2@x>", 1, 2000.0, "421 busy", 1013.0)
        await cat.record_in_mail("in1", "spool/inbox/in1", 99, 1020.0)
        await cat.finish_in_mail("in1", MailState.QUARANTINED, 1021.0, error="mail is not signed")
        # what the PACS answered, and a receipt still owed: both must survive a restore
        await cat.queue_forwards([infos[0].sop_instance_uid, infos[1].sop_instance_uid], ["pacs1"], 1030.0)
        await cat.record_forward(
            infos[0].sop_instance_uid, "pacs1", "rejected", 5, 1031.0, status=0xA700, error="out of resources"
        )
        await cat.queue_receipt_out(
            "in1:deleted/error", "gateway-b", "b@x", "<m.1@x>", "deleted/error", "not DICOM", 1032.0
        )
    finally:
        await cat.close()


async def dump(url: str) -> dict[str, list[tuple[object, ...]]]:
    cat = await open_catalog(url)
    try:
        # the backup's table list is derived from the schema: it must name every table the database has
        if url.startswith("sqlite"):
            names = await cat.db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
        else:
            names = await cat.db.fetchall(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()"
            )
        assert {str(n[0]) for n in names} - {"schema_version"} == set(catalog.TABLES)
        return {
            t: sorted(tuple(r) for r in await cat.db.fetchall(f"SELECT * FROM {t}")) for t in catalog.TABLES
        }
    finally:
        await cat.close()


@pytest.mark.parametrize("direction", ["sqlite-to-mariadb", "mariadb-to-sqlite"])
async def test_backup_wipe_restore_is_identical(
    direction, tmp_path, pki_dir, mariadb_url, second_mariadb_url
):  # type: ignore[no-untyped-def]
    source = f"sqlite:///{tmp_path / 'src.sqlite'}" if direction.startswith("sqlite") else mariadb_url
    target = (
        second_mariadb_url if direction.endswith("mariadb") else f"sqlite:///{tmp_path / 'restored.sqlite'}"
    )
    settings = write_settings(tmp_path, pki_dir, source)
    await populate(source, tmp_path)
    before = await dump(source)
    trail = AuditTrail(settings.e_root / "audit", settings.name)
    trail.record([AuditEvent("k", EXPORT, "R", 1.7e9, participants=(Participant("gw", True),))])
    result = await backup.run_backup(settings)
    assert result.rows["instances"] == 6 and result.rows["mails"] == 3
    (day,) = trail.days()
    copied = result.path / "audit" / f"{day}.jsonl"
    assert copied.read_bytes() == (settings.e_root / "audit" / f"{day}.jsonl").read_bytes(), (
        "the audit trail too"
    )
    assert f"audit/{day}.jsonl" in backup.verify(result.path)["files"]
    assert (result.path / "catalog.sqlite").exists() == direction.startswith("sqlite")
    assert not (result.path / "keys").exists(), "no private keys unless the operator asks"

    # an empty machine: nothing of the catalog, the configuration or the certificates
    restored = tmp_path / "restored-site"
    counts = await backup.restore(result.path, target, config_to=restored)
    assert counts["transfers"] == 1 and counts["pacs_forwards"] == 2 and counts["receipts_out"] == 1
    after = await dump(target)
    assert after == before, "catalog rows and transfer history identical after restore"
    assert (restored / "gateway.toml.backed-up").read_bytes() == settings.source.read_bytes()
    # the restored configuration names the restored files and the new catalog, and loads as it is
    again = config.load(restored / "gateway.toml")
    assert again.database_url == target
    assert again.partners[0].smime_cert == restored / "partners-0-smime_cert.pem"
    assert again.partners[0].smime_cert.read_bytes() == settings.partners[0].smime_cert.read_bytes()
    for ref in again.file_refs:
        private = b"PRIVATE KEY" in ref.path.read_bytes()
        assert (ref.path.parent == restored) != private, (
            f"{ref.key}: public files restored, keys where they were"
        )
    with pytest.raises(backup.BackupError, match="not empty"):
        await backup.restore(result.path, target, config_to=restored)


async def test_damaged_backups_are_refused_with_the_reason(tmp_path, pki_dir):  # type: ignore[no-untyped-def]
    settings = write_settings(tmp_path, pki_dir, None)
    await populate(settings.database_url, tmp_path)
    result = await backup.run_backup(settings)
    rows = result.path / "catalog" / "instances.jsonl"
    original = rows.read_bytes()
    data = bytearray(original)
    data[10] ^= 0x01
    rows.write_bytes(bytes(data))
    with pytest.raises(backup.BackupError, match=r"instances.jsonl is damaged"):
        backup.verify(result.path)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "restore",
            str(result.path),
            "--database-url",
            f"sqlite:///{tmp_path / 'x.sqlite'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 1 and "restore refused" in r.stderr and "checksum mismatch" in r.stderr
    rows.write_bytes(original)
    backup.verify(result.path)
    (result.path / "config" / "gateway.toml").unlink()
    with pytest.raises(backup.BackupError, match=r"gateway\.toml is missing"):
        backup.verify(result.path)
    (result.path / "manifest.json").write_text("{broken")
    with pytest.raises(backup.BackupError, match=r"manifest\.json is damaged"):
        backup.verify(result.path)


async def test_retention_keeps_exactly_the_newest_five_days(tmp_path, pki_dir):  # type: ignore[no-untyped-def]
    settings = write_settings(tmp_path, pki_dir, None)
    await populate(settings.database_url, tmp_path)
    for day in range(1, 9):
        await backup.run_backup(settings, now=dt.datetime(2026, 11, day, 2, 0))
    kept = sorted(p.name for p in backup.backup_root(settings).iterdir() if p.is_dir())
    assert kept == [f"202611{d:02d}-020000" for d in range(4, 9)]


async def test_private_keys_only_encrypted_and_on_request(tmp_path, pki_dir, monkeypatch):  # type: ignore[no-untyped-def]
    settings = write_settings(
        tmp_path, pki_dir, None, '\n[backup]\ninclude_private_keys = true\npassphrase_env = "TEST_BK_PW"\n'
    )
    await populate(settings.database_url, tmp_path)
    monkeypatch.delenv("TEST_BK_PW", raising=False)
    with pytest.raises(backup.BackupError, match="passphrase"):
        await backup.run_backup(settings)
    assert [p for p in backup.backup_root(settings).iterdir() if p.is_dir()] == [], (
        "a failed backup leaves no set"
    )
    monkeypatch.setenv("TEST_BK_PW", "correct horse battery")
    result = await backup.run_backup(settings)
    pem = (result.path / "keys" / "smime-key.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    key = serialization.load_pem_private_key(pem, b"correct horse battery")
    assert (
        key.public_key().public_numbers()
        == serialization.load_pem_private_key(  # type: ignore[union-attr]
            settings.smime_key.read_bytes(), None
        )
        .public_key()
        .public_numbers()
    )
    assert json.loads((result.path / "manifest.json").read_text())["files"]["keys/smime-key.key"]["sha256"]


def test_schedule_and_outcome(tmp_path, pki_dir):  # type: ignore[no-untyped-def]
    at = dt.time(2, 0)
    assert backup.next_run(dt.datetime(2026, 11, 23, 1, 59), at) == dt.datetime(2026, 11, 23, 2, 0)
    assert backup.next_run(dt.datetime(2026, 11, 23, 2, 0), at) == dt.datetime(2026, 11, 24, 2, 0)
    settings = write_settings(tmp_path, pki_dir, None)
    backup.record_outcome(settings, False, "OSError: disk full", when=123.0)
    assert backup.last_outcome(settings) == {"ok": False, "detail": "OSError: disk full", "at": 123.0}
    # the 02:00 backup did not happen (the gateway, or the cluster node making it, was down): made at once
    night = dt.datetime(2026, 11, 23, 2, 0)
    backup.record_outcome(settings, True, "set", when=(night - dt.timedelta(days=1)).timestamp())
    assert backup.missed(settings, night + dt.timedelta(hours=3))
    assert not backup.missed(settings, night - dt.timedelta(minutes=1)), (
        "yesterday's was made: nothing missed yet"
    )
    backup.record_outcome(settings, False, "OSError: disk full", when=night.timestamp() + 60)
    assert not backup.missed(settings, night + dt.timedelta(hours=3)), "tried (and failed): check_mk says so"


async def test_each_set_is_also_copied_elsewhere(tmp_path, pki_dir):  # type: ignore[no-untyped-def]
    second = tmp_path / "nas"
    second.mkdir()
    settings = write_settings(tmp_path, pki_dir, None, f'\n[backup]\ncopy_to = "{second}"\n')
    await populate(settings.database_url, tmp_path)
    result = await backup.run_backup(settings)
    copy = second / result.path.name
    assert backup.verify(copy)["gateway"] == "gateway-a"
    assert (copy / "catalog" / "instances.jsonl").read_bytes() == (
        result.path / "catalog" / "instances.jsonl"
    ).read_bytes()


def test_a_restored_gateway_starts_and_finishes_the_work_it_owed(mail, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    """B has stored a study from A while its PACS is down: the forwards are pending and the receipt to A waits for
    the PACS. B's catalog is lost. `restore SET --database-url NEW --config-to DIR` (as an operator types it)
    gives a configuration that starts as it is; the restored B forwards to the PACS once it is up and sends A the
    receipt it owed, and A shows the transfer confirmed."""
    pacs_port = free_port()
    pacs = (
        f'[[pacs]]\nname = "orthanc"\nhost = "127.0.0.1"\nport = {pacs_port}\nae_title = "ORTHANC"\n'
        "max_attempts = 1000\nretry_base = 1\ntimeout = 5\n"
    )
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1, tail=pacs)
    a = make_gateway("gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1, poll_interval=1)
    b.start()
    a.start()
    make_study(tmp_path / "s", ct=2, mr=1, sc=0, size=16)
    assert storescu(a.port, "TO_B", tmp_path / "s").returncode == 0

    def retrying(gw) -> bool:  # type: ignore[no-untyped-def]
        rows = json.loads(gw.cli("status", "--json"))["pacs_forwards"]
        return sum(r["count"] for r in rows if r["state"] == "retry") == 3

    wait_for(lambda: retrying(b), 120, 1, "B stored the study and cannot reach its PACS")
    assert "backup" in b.cli("backup").lower()
    b.stop()
    (b.d_root / "catalog.sqlite").unlink()  # the catalog is lost; D: with the instances is still there
    sets = sorted(p for p in (b.config.parent / "e" / "backup").iterdir() if p.is_dir())
    site = tmp_path / "restored-b"
    new_db = f"sqlite:///{tmp_path / 'restored-b.sqlite'}"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "restore",
            str(sets[-1]),
            "--database-url",
            new_db,
            "--config-to",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert f"run -c {site / 'gateway.toml'}" in r.stdout
    # the backup and the restore are in B's audit trail, with who ran them
    trail = AuditTrail(b.config.parent / "e" / "audit", "gateway-b")
    texts = [x.xml for d in trail.days() for x in trail.records(d)]
    assert any('"Export"' in t and '"Backup"' in t and 'UserID="cli:' in t for t in texts)
    [restore] = [t for t in texts if '"Restore"' in t]
    assert '"Import"' in restore and sets[-1].name in restore and 'EventOutcomeIndicator="0"' in restore
    assert all(trail.verify(d)[0] for d in trail.days())
    restored = GatewayProcess("gateway-b", site / "gateway.toml", b.port, site / "gateway.log", b.d_root)
    peer = orthanc_peer.start(tmp_path / "orthanc", dicom_port=pacs_port)
    try:
        restored.start()
        wait_for(
            lambda: (
                {
                    (f["state"], f["count"])
                    for f in json.loads(restored.cli("status", "--json"))["pacs_forwards"]
                }
                == {("accepted", 3)}
            ),
            120,
            1,
            "the pending forwards completed after the restore",
        )
        assert len(json.loads(peer.rest("/instances"))) == 3
        wait_for(
            lambda: json.loads(a.cli("status", "--json"))["transfers"][0]["receipt"] == "confirmed",
            120,
            1,
            "the receipt B owed reached A",
        )
    finally:
        restored.stop()
        peer.stop()
