"""Backup and restore of configuration, certificates, catalog and queue metadata ("E:", `e_root/backup/`).

A backup set is a folder `e_root/backup/<YYYYmmdd-HHMMSS>/`:

    manifest.json          every file with its SHA-256 and size, the gateway, the schema version, the backend
    catalog/<table>.jsonl  one JSON object per row, from one consistent snapshot (backend-neutral: a SQLite backup
                           restores into MariaDB and back)
    catalog.sqlite         with the SQLite backend also the database file itself (SQLite online backup API)
    config/                the configuration file and every certificate it names (public parts)
    keys/                  private keys, only with `backup.include_private_keys`, encrypted with the passphrase
                           from the environment variable `backup.passphrase_env`
    queues.json            metadata of every queue item (state, reason, attempts), not the mails themselves
    audit/                 the audit trail's day files (`gateway.audit`), readable by the gateway's user only

A set counts only when its manifest verifies; older sets are removed only after a new set verified, keeping
`backup.keep_days` days. The snapshot runs on its own database connection and never blocks DICOM reception.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from gateway.catalog import MIGRATIONS, TABLES, open_catalog, snapshot
from gateway.config import Settings
from gateway.storage import fsync_dir, sha256_file

if TYPE_CHECKING:
    from gateway.auditing import Auditor

log = logging.getLogger(__name__)

STAMP = "%Y%m%d-%H%M%S"


class BackupError(RuntimeError):
    """A backup could not be made, or a backup set is damaged; the message says why."""


@dataclass(frozen=True)
class BackupResult:
    """What a backup run produced."""

    path: Path
    files: int
    bytes: int
    rows: dict[str, int]
    removed: list[str]


def _read_rows(src: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()]


def backup_root(settings: Settings) -> Path:
    """Where backup sets live."""
    return settings.e_root / "backup"


# ---------------------------------------------------------------------------------------------- the set
def _is_secret(path: Path) -> bool:
    """A private key (PEM or an OpenPGP secret key block): never copied in the clear."""
    head = path.read_bytes()[: 1 << 16]
    return b"PRIVATE KEY-----" in head or b"PGP PRIVATE KEY BLOCK" in head


def _ref_name(key: tuple[str | int, ...], path: Path) -> str:
    """The file's name inside the set: where the configuration names it, e.g. `partners-0-smime_cert.pem`."""
    return "-".join(str(k) for k in key) + "".join(path.suffixes[-2:])


def config_refs(settings: Settings) -> list[dict[str, Any]]:
    """Every file the configuration names (derived from what the configuration reader read as a file, so a new
    setting can never be forgotten): its key in the document, its name in the set, where it was, and whether it
    is a private key."""
    return [
        {
            "key": list(ref.key),
            "file": _ref_name(ref.key, ref.path),
            "original": str(ref.path),
            "secret": _is_secret(ref.path),
        }
        for ref in settings.file_refs
    ]


def _config_files(settings: Settings) -> dict[str, Path]:
    """The configuration and every public file it names, by name inside config/."""
    files = {"gateway.toml": settings.source}
    for ref in config_refs(settings):
        if not ref["secret"]:
            files[ref["file"]] = Path(ref["original"])
    return files


def _encrypted_key(path: Path, passphrase: bytes) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def _queue_metadata(settings: Settings) -> dict[str, Any]:
    from gateway.core.queue import QueueState
    from gateway.spool import Spool
    from gateway.storage import Storage

    storage = Storage(settings.d_root)
    out: dict[str, Any] = {}
    for name, root in (("outbox", storage.outbox), ("inbox", storage.inbox)):
        spool = Spool(root, storage.tmp)
        out[name] = [
            {"id": item.id, "state": state.value, "meta": item.meta}
            for state in QueueState
            if spool.dirs[state].exists()
            for item in spool.items(state)
        ]
    return out


def _write_manifest(folder: Path, info: dict[str, Any]) -> tuple[int, int]:
    files = {}
    total = 0
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            size = p.stat().st_size
            files[str(p.relative_to(folder))] = {"sha256": sha256_file(p), "size": size}
            total += size
            with p.open("rb") as f:
                os.fsync(f.fileno())
    manifest = {**info, "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    fsync_dir(folder)
    return len(files), total


def verify(folder: Path) -> dict[str, Any]:
    """Check a backup set against its manifest; raise `BackupError` with the reason, or return the manifest."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise BackupError(f"{folder}: no manifest.json (incomplete backup)") from None
    except ValueError:
        raise BackupError(f"{folder}: manifest.json is damaged") from None
    listed = manifest.get("files", {})
    for rel, expect in sorted(listed.items()):
        p = folder / rel
        if not p.is_file():
            raise BackupError(f"{folder}: {rel} is missing")
        if p.stat().st_size != expect["size"] or sha256_file(p) != expect["sha256"]:
            raise BackupError(f"{folder}: {rel} is damaged (checksum mismatch)")
    present = {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"
    }
    if present - set(listed):
        raise BackupError(f"{folder}: files not in the manifest: {', '.join(sorted(present - set(listed)))}")
    return dict(manifest)


def apply_retention(root: Path, keep_days: float, newest: dt.datetime) -> list[str]:
    """Remove sets older than `keep_days` before the newest verified one; return the removed names."""
    cutoff = newest - dt.timedelta(days=keep_days)
    removed = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            when = dt.datetime.strptime(folder.name, STAMP)
        except ValueError:
            continue  # not ours
        if when <= cutoff:
            shutil.rmtree(folder)
            removed.append(folder.name)
    if removed:
        fsync_dir(root)
    return removed


def _copy_elsewhere(folder: Path, target: str) -> None:
    """The seed asks for a second copy: a local path, or an rsync target (host:path)."""
    if ":" in target and not Path(target).exists() and not target.startswith("/"):
        subprocess.run(["rsync", "-a", f"{folder}", target], check=True, capture_output=True, timeout=3600)
    else:
        dest = Path(target) / folder.name
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        verify(dest)


def _copy_audit(trail: Path, into: Path) -> None:
    """The audit trail's day files as they are (their hash chain stays verifiable), for the gateway's user only;
    a cluster's every node's trail (`audit/<node>/`)."""
    if trail.is_dir():
        into.mkdir(mode=0o700)
        for day in sorted(trail.rglob("????-??-??.jsonl")):
            target = into / day.relative_to(trail)
            target.parent.mkdir(mode=0o700, exist_ok=True)
            shutil.copy2(day, target)


async def run_backup(settings: Settings, now: dt.datetime | None = None) -> BackupResult:
    """Make, verify and record one backup set; then apply retention and copy it elsewhere if configured.

    Size: the set's whole making, from the partial folder to the verified rename, so its crash story reads in order."""
    now = now or dt.datetime.now()
    root = backup_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / now.strftime(STAMP)
    partial = root / f".{folder.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "catalog").mkdir(parents=True)
    (partial / "config").mkdir()
    try:
        if settings.catalog_is_sqlite:
            db_path = Path(settings.database_url[len("sqlite:///") :])
            version, counts = await asyncio.to_thread(
                snapshot.sqlite_snapshot, db_path, partial / "catalog", partial / "catalog.sqlite"
            )
        else:
            version, counts = await snapshot.mysql_snapshot(settings.database_url, partial / "catalog")
        for name, src in _config_files(settings).items():
            shutil.copy2(src, partial / "config" / name)
        bk = settings.backup
        if bk.include_private_keys:
            passphrase = os.environ.get(bk.passphrase_env, "").encode()
            if len(passphrase) < 12:
                raise BackupError(
                    f"include_private_keys needs a passphrase of 12+ characters in ${bk.passphrase_env}"
                )
            (partial / "keys").mkdir()
            for ref in config_refs(settings):
                if ref["secret"]:
                    key = Path(ref["original"])
                    # an OpenPGP secret key is kept as it is: it is protected by its own passphrase
                    data = (
                        key.read_bytes()
                        if b"PGP PRIVATE" in key.read_bytes()
                        else _encrypted_key(key, passphrase)
                    )
                    (partial / "keys" / ref["file"]).write_bytes(data)
        (partial / "queues.json").write_text(json.dumps(_queue_metadata(settings), default=str))
        _copy_audit(settings.e_root / "audit", partial / "audit")  # the trail, hash chain and all
        info = {
            "gateway": settings.name,
            "created": now.isoformat(timespec="seconds"),
            "schema_version": version,
            "backend": "sqlite" if settings.catalog_is_sqlite else "mysql",
            "rows": counts,
            "config_paths": {name: str(p) for name, p in _config_files(settings).items()},
            "config_refs": config_refs(settings),
        }
        files, size = await asyncio.to_thread(_write_manifest, partial, info)
        os.rename(partial, folder)
        fsync_dir(root)
        await asyncio.to_thread(verify, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    removed = apply_retention(root, settings.backup.keep_days, now)
    if settings.backup.copy_to:
        await asyncio.to_thread(_copy_elsewhere, folder, settings.backup.copy_to)
    return BackupResult(folder, files, size, counts, removed)


def record_outcome(settings: Settings, ok: bool, detail: str, when: float | None = None) -> None:
    """Remember the last backup's outcome for monitoring (`e_root/backup/last.json`)."""
    root = backup_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    data = {"ok": ok, "detail": detail[:500], "at": when or time.time()}
    tmp = root / ".last.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, root / "last.json")


def last_outcome(settings: Settings) -> dict[str, Any] | None:
    """The last recorded backup outcome, if any."""
    try:
        return dict(json.loads((backup_root(settings) / "last.json").read_text()))
    except (OSError, ValueError):
        return None


def record_restore(folder: Path, manifest: dict[str, Any], who: str, ok: bool, detail: str) -> Path | None:
    """The restore's audit event (Import), in the trail of the E: the set was made on (`e_root/backup/<set>`:
    `e_root/audit`); None when the set lies elsewhere (then nothing says which trail is the gateway's)."""
    from gateway.audit import AuditTrail
    from gateway.core import audit as A

    if folder.resolve().parent.name != "backup":
        return None
    trail_dir = folder.resolve().parent.parent / "audit"
    at = time.time()
    name = str(manifest.get("gateway", "dicom-mail-gateway"))
    me = A.Participant(name, False, "", A.ROLE_APPLICATION)
    event = A.AuditEvent(
        key=f"restore:{folder.name}:{at:.6f}",
        event=A.IMPORT,
        action="E",
        at=at,
        outcome="success" if ok else "serious",
        outcome_text=detail[:200],
        types=(A.RESTORE,),
        participants=(A.Participant(who, True), me),
        source=name,
        extra={"backup": folder.name},
    )
    AuditTrail(trail_dir, name).record([event])
    return trail_dir


# ---------------------------------------------------------------------------------------------- restore
async def restore(
    folder: Path, database_url: str, config_to: Path | None = None, force: bool = False
) -> dict[str, int]:
    """Verify a set, rebuild the catalog into `database_url` (empty), and write the configuration files back.

    Configuration and certificates go back to the paths recorded at backup time, or below `config_to`.
    """
    manifest = await asyncio.to_thread(verify, folder)
    if int(manifest.get("schema_version", 0)) > len(MIGRATIONS):
        raise BackupError(f"{folder}: made by a newer gateway (schema {manifest['schema_version']})")
    catalog = await open_catalog(database_url)
    counts: dict[str, int] = {}
    try:
        occupied = await catalog.first_table_with_rows()
        if occupied is not None and not force:
            raise BackupError(
                f"the target catalog is not empty ({occupied} has rows); restore refuses to mix"
            )
        counts = await catalog.load_rows(
            {table: _read_rows(folder / "catalog" / f"{table}.jsonl") for table in TABLES}
        )
    finally:
        await catalog.close()
    if config_to is not None and manifest.get("config_refs") is not None:
        await asyncio.to_thread(_config_into, folder, manifest, config_to, database_url, force)
    else:
        for name, original in manifest.get("config_paths", {}).items():
            target = (config_to / name) if config_to else Path(original)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() or force:
                shutil.copy2(folder / "config" / name, target)
    return counts


def _config_into(
    folder: Path, manifest: dict[str, Any], config_to: Path, database_url: str, force: bool
) -> None:
    """Write the configuration and its files below `config_to`, the configuration's paths rewritten to them
    (and its catalog URL to `database_url`), so that `run -c config_to/gateway.toml` starts as restored. Private
    keys come from keys/ (decrypted with the backup passphrase) when the set has them; otherwise the
    configuration keeps their original paths, where the operator must put them back."""
    import tomllib

    from cryptography.hazmat.primitives import serialization

    from gateway.core import tomlfile

    target = config_to / "gateway.toml"
    if target.exists() and not force:
        raise BackupError(f"{target} exists; restore refuses to overwrite it (--force)")
    config_to.mkdir(parents=True, exist_ok=True)
    text = (folder / "config" / "gateway.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    passphrase_env = data.get("backup", {}).get("passphrase_env", "DMG_BACKUP_PASSPHRASE")
    for ref in manifest["config_refs"]:
        new = config_to / ref["file"]
        if not ref["secret"]:
            shutil.copy2(folder / "config" / ref["file"], new)
        elif (folder / "keys" / ref["file"]).exists():
            raw = (folder / "keys" / ref["file"]).read_bytes()
            if b"PGP PRIVATE" not in raw:
                passphrase = os.environ.get(passphrase_env, "").encode()
                if not passphrase:
                    raise BackupError(f"the set holds encrypted private keys: set ${passphrase_env}")
                try:
                    key = serialization.load_pem_private_key(raw, passphrase)
                except ValueError:
                    raise BackupError(f"${passphrase_env} does not decrypt the private keys") from None
                raw = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
        else:
            continue  # the key stays where the configuration said
        table: Any = data
        for part in ref["key"][:-1]:
            table = table[part]
        table[ref["key"][-1]] = str(new)
    data.setdefault("database", {})["url"] = database_url
    (config_to / "gateway.toml.backed-up").write_text(text, encoding="utf-8")  # with its comments, as it was
    target.write_text(tomlfile.dumps(data), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- schedule
def next_run(now: dt.datetime, at: dt.time) -> dt.datetime:
    """The next local time `at` strictly after `now`."""
    candidate = now.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + dt.timedelta(days=1)


def missed(settings: Settings, now: dt.datetime) -> bool:
    """Whether the last scheduled backup did not happen (the gateway, or the cluster node making it, was down)."""
    last, scheduled = last_outcome(settings), next_run(now - dt.timedelta(days=1), settings.backup.time)
    return last is not None and scheduled <= now and float(last.get("at", 0)) < scheduled.timestamp()


async def run_forever(settings: Settings, audit: Auditor | None = None) -> None:
    """Back up every day at `backup.time`, and at once if the last one was `missed`; never dies."""
    catch_up = missed(settings, dt.datetime.now())
    while True:
        now = dt.datetime.now()
        await asyncio.sleep(0.0 if catch_up else (next_run(now, settings.backup.time) - now).total_seconds())
        catch_up = False
        try:
            result = await run_backup(settings)
            record_outcome(settings, True, f"{result.path.name}: {result.files} files, {result.bytes} bytes")
            log.info(
                "backup %s: %d files, %d bytes; removed %s",
                result.path.name,
                result.files,
                result.bytes,
                result.removed or "none",
            )
            if audit is not None:
                await audit.backup(
                    False, True, result.path.name, f"{result.files} files, {result.bytes} bytes"
                )
        except Exception as exc:
            record_outcome(settings, False, f"{type(exc).__name__}: {exc}")
            log.exception("backup failed")
            if audit is not None:
                with contextlib.suppress(Exception):
                    await audit.backup(False, False, "-", type(exc).__name__)
