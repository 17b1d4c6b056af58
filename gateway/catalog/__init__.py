"""The catalog: the index of studies, series, instances, transfers and mails (the files are the content).

Both backends run the same SQL (see `db.py`). Schema creation and upgrades are automatic and versioned: the
`schema_version` table holds the last applied migration; `MIGRATIONS` only ever grows.
State changes go through `core.states`, so an illegal move raises before it reaches the database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.catalog.db import Database, connect
from gateway.core.dicominfo import InstanceInfo
from gateway.core.states import MailState, TransferState, check_mail, check_transfer, settle_receipt

__all__ = ["MIGRATIONS", "TABLES", "Catalog", "InstanceRecord", "ReceiptMatch", "open_catalog"]

MIGRATIONS: list[list[str]] = [
    # 1: the first schema
    [
        """CREATE TABLE studies (
            study_uid VARCHAR(64) NOT NULL PRIMARY KEY,
            first_seen DOUBLE NOT NULL,
            last_received DOUBLE NOT NULL)""",
        """CREATE TABLE series (
            series_uid VARCHAR(64) NOT NULL PRIMARY KEY,
            study_uid VARCHAR(64) NOT NULL,
            modality VARCHAR(16),
            series_number INTEGER)""",
        """CREATE TABLE instances (
            sop_uid VARCHAR(64) NOT NULL PRIMARY KEY,
            series_uid VARCHAR(64) NOT NULL,
            study_uid VARCHAR(64) NOT NULL,
            sop_class_uid VARCHAR(64) NOT NULL,
            transfer_syntax VARCHAR(64) NOT NULL,
            path VARCHAR(512) NOT NULL,
            size BIGINT NOT NULL,
            sha256 CHAR(64) NOT NULL,
            source VARCHAR(16) NOT NULL,
            origin VARCHAR(64) NOT NULL,
            route VARCHAR(64),
            out_transfer VARCHAR(160),
            in_transfer VARCHAR(160),
            received_at DOUBLE NOT NULL)""",
        "CREATE INDEX ix_instances_study ON instances (study_uid)",
        "CREATE INDEX ix_instances_route ON instances (route, out_transfer)",
        """CREATE TABLE transfers (
            id VARCHAR(160) NOT NULL PRIMARY KEY,
            direction VARCHAR(3) NOT NULL,
            partner VARCHAR(64) NOT NULL,
            study_uid VARCHAR(64),
            state VARCHAR(16) NOT NULL,
            parts_total INTEGER,
            parts_done INTEGER NOT NULL DEFAULT 0,
            instance_count INTEGER NOT NULL DEFAULT 0,
            bytes BIGINT NOT NULL DEFAULT 0,
            created_at DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL,
            error TEXT)""",
        "CREATE INDEX ix_transfers_state ON transfers (direction, state)",
        """CREATE TABLE transfer_items (
            transfer_id VARCHAR(160) NOT NULL,
            sop_uid VARCHAR(64) NOT NULL,
            PRIMARY KEY (transfer_id, sop_uid))""",
        """CREATE TABLE mails (
            id VARCHAR(190) NOT NULL PRIMARY KEY,
            direction VARCHAR(3) NOT NULL,
            transfer_id VARCHAR(160),
            part INTEGER,
            total INTEGER,
            state VARCHAR(16) NOT NULL,
            path VARCHAR(512),
            size BIGINT NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt DOUBLE,
            node VARCHAR(128),
            created_at DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL,
            error TEXT)""",
        "CREATE INDEX ix_mails_transfer ON mails (transfer_id, part)",
        "CREATE INDEX ix_mails_state ON mails (direction, state)",
    ],
    # 2: forwarding to the local PACS
    [
        """CREATE TABLE pacs_forwards (
            sop_uid VARCHAR(64) NOT NULL,
            pacs VARCHAR(64) NOT NULL,
            state VARCHAR(16) NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt DOUBLE,
            status INTEGER,
            created_at DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL,
            error TEXT,
            PRIMARY KEY (sop_uid, pacs))""",
        "CREATE INDEX ix_pacs_forwards_state ON pacs_forwards (state, next_attempt)",
        # files of instances every PACS accepted are removed after storage.keep_days_after_pacs; the row stays
        "ALTER TABLE instances ADD COLUMN purged_at DOUBLE",
    ],
    # 3: receipts (MDN) both ways, compression figures
    [
        # outbound mails: the Message-ID a partner's receipt names (the enclosed mail of message/partial
        # fragments), and what the receipt said
        "ALTER TABLE mails ADD COLUMN mdn_id VARCHAR(190)",
        "ALTER TABLE mails ADD COLUMN receipt VARCHAR(24)",
        "ALTER TABLE mails ADD COLUMN receipt_detail TEXT",
        "CREATE INDEX ix_mails_mdn ON mails (mdn_id)",
        # outbound transfers: awaited / confirmed / warning / failed / overdue / not-requested
        "ALTER TABLE transfers ADD COLUMN receipt VARCHAR(24)",
        "ALTER TABLE transfers ADD COLUMN receipt_detail TEXT",
        "ALTER TABLE transfers ADD COLUMN receipt_at DOUBLE",
        "ALTER TABLE transfers ADD COLUMN bytes_wire BIGINT",
        # receipts we owe our partners: waiting (for the PACS) → queued (in the outbox) → sent
        """CREATE TABLE receipts_out (
            id VARCHAR(190) NOT NULL PRIMARY KEY,
            partner VARCHAR(64) NOT NULL,
            to_addr VARCHAR(254) NOT NULL,
            original_message_id VARCHAR(250) NOT NULL,
            sop_uids TEXT,
            outcome VARCHAR(24) NOT NULL,
            detail TEXT,
            state VARCHAR(16) NOT NULL,
            created_at DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL)""",
        "CREATE INDEX ix_receipts_out_state ON receipts_out (state)",
    ],
    # 4: a receipt that contradicts the partner's first answer is kept beside it, never over it
    [
        "ALTER TABLE transfers ADD COLUMN receipt_conflict TEXT",
    ],
]


# Every table of the schema, in the order the migrations create them: derived, never listed by hand, so that a
# backup (and anything else that must cover every table) cannot forget a new one. `schema_version` is not here:
# it is bookkeeping, recorded in a backup's manifest instead.
TABLES: tuple[str, ...] = tuple(
    name
    for statements in MIGRATIONS
    for sql in statements
    for name in re.findall(r"^\s*CREATE TABLE (\w+)", sql)
)


@dataclass(frozen=True)
class ReceiptMatch:
    """What a partner's receipt did: the transfer it answers (None: no mail we sent to that partner), whether
    it only repeated what the partner said before, or the contradiction it was recorded as."""

    transfer_id: str | None
    replay: bool = False
    contradiction: str | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance as the catalog indexes it."""

    info: InstanceInfo
    path: str
    size: int
    sha256: str
    source: str  # "dicom" | "mail" | "manual"
    origin: str  # calling AE title or sending partner
    route: str | None  # partner to send to, None = stays here
    received_at: float
    in_transfer: str | None = None


class Catalog:
    """Typed operations over the catalog tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ----------------------------------------------------------------------------- schema
    async def migrate(self) -> int:
        """Apply missing migrations in order; return the schema version now in force."""
        async with self.db.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = await tx.fetchall("SELECT version FROM schema_version")
            if not rows:
                await tx.execute("INSERT INTO schema_version (version) VALUES (0)")
        version = int((await self.db.fetchone("SELECT version FROM schema_version"))[0])  # type: ignore[index]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"catalog schema {version} is newer than this gateway ({len(MIGRATIONS)})")
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            # MariaDB commits DDL implicitly; each migration is written so that re-running a half-applied one
            # fails loudly instead of silently skipping (the operator restores the backup).
            async with self.db.transaction() as tx:
                for sql in statements:
                    await tx.execute(sql)
                await tx.execute("UPDATE schema_version SET version = ?", (number,))
            version = number
        return version

    async def close(self) -> None:
        await self.db.close()

    # ----------------------------------------------------------------------------- instances
    async def record_instances(self, records: list[InstanceRecord]) -> int:
        """Index stored instances (idempotent: a known SOP Instance UID is left as it is); return how many were new."""
        ig = self.db.dialect.insert_ignore
        new = 0
        async with self.db.transaction() as tx:
            for r in records:
                i = r.info
                new += await tx.execute(
                    f"""{ig} INTO instances (sop_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, path,
                        size, sha256, source, origin, route, in_transfer, received_at)
                        VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)""",
                    (
                        i.sop_instance_uid,
                        i.series_uid,
                        i.study_uid,
                        i.sop_class_uid,
                        i.transfer_syntax,
                        r.path,
                        r.size,
                        r.sha256,
                        r.source,
                        r.origin,
                        r.route,
                        r.in_transfer,
                        r.received_at,
                    ),
                )
                # stored again after its file was purged: the row points at the new file
                await tx.execute(
                    "UPDATE instances SET purged_at = NULL, path = ? WHERE sop_uid = ? AND purged_at IS NOT NULL",
                    (r.path, i.sop_instance_uid),
                )
                await tx.execute(
                    f"{ig} INTO series (series_uid, study_uid, modality, series_number) VALUES (?,?,?,?)",
                    (i.series_uid, i.study_uid, i.modality, i.series_number),
                )
                await tx.execute(
                    f"{ig} INTO studies (study_uid, first_seen, last_received) VALUES (?,?,?)",
                    (i.study_uid, r.received_at, r.received_at),
                )
                await tx.execute(
                    "UPDATE studies SET last_received = ? WHERE study_uid = ? AND last_received < ?",
                    (r.received_at, i.study_uid, r.received_at),
                )
        return new

    async def instance(self, sop_uid: str) -> dict[str, Any] | None:
        """One instance row as a dict."""
        row = await self.db.fetchone(
            "SELECT sop_uid, study_uid, series_uid, path, size, sha256, source, origin, route, out_transfer, in_transfer "
            "FROM instances WHERE sop_uid = ?",
            (sop_uid,),
        )
        keys = (
            "sop_uid",
            "study_uid",
            "series_uid",
            "path",
            "size",
            "sha256",
            "source",
            "origin",
            "route",
            "out_transfer",
            "in_transfer",
        )
        return dict(zip(keys, row, strict=True)) if row else None

    async def stable_routes(self, quiet_since: float) -> list[tuple[str, str]]:
        """(study, partner) pairs with unsent routed instances and no new instance since `quiet_since`."""
        rows = await self.db.fetchall(
            """SELECT i.study_uid, i.route FROM instances i JOIN studies s ON s.study_uid = i.study_uid
               WHERE i.route IS NOT NULL AND i.out_transfer IS NULL AND s.last_received <= ?
               GROUP BY i.study_uid, i.route ORDER BY MIN(i.received_at)""",
            (quiet_since,),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    # ----------------------------------------------------------------------------- outbound transfers
    async def create_out_transfer(self, transfer_id: str, partner: str, study_uid: str, now: float) -> int:
        """Create a pending transfer carrying every unsent instance of the study routed to the partner."""
        async with self.db.transaction() as tx:
            await tx.execute(
                """INSERT INTO transfers (id, direction, partner, study_uid, state, created_at, updated_at)
                   VALUES (?, 'out', ?, ?, ?, ?, ?)""",
                (transfer_id, partner, study_uid, TransferState.PENDING.value, now, now),
            )
            await tx.execute(
                """INSERT INTO transfer_items (transfer_id, sop_uid) SELECT ?, sop_uid FROM instances
                   WHERE study_uid = ? AND route = ? AND out_transfer IS NULL""",
                (transfer_id, study_uid, partner),
            )
            await tx.execute(
                "UPDATE instances SET out_transfer = ? WHERE study_uid = ? AND route = ? AND out_transfer IS NULL",
                (transfer_id, study_uid, partner),
            )
            return await self._count_items(tx, transfer_id)

    async def _count_items(self, tx: Any, transfer_id: str) -> int:
        """Refresh a transfer's instance count and bytes from its items; return the count."""
        rows = await tx.fetchall(
            """SELECT COUNT(*), COALESCE(SUM(i.size), 0) FROM transfer_items t
               JOIN instances i ON i.sop_uid = t.sop_uid WHERE t.transfer_id = ?""",
            (transfer_id,),
        )
        count, size = int(rows[0][0]), int(rows[0][1])
        await tx.execute(
            "UPDATE transfers SET instance_count = ?, bytes = ? WHERE id = ?", (count, size, transfer_id)
        )
        return count

    async def enqueue_manual(
        self, records: list[InstanceRecord], transfer_id: str, partner: str, now: float
    ) -> int:
        """Index instances handed in by `send` and put them into a new pending transfer (even if sent before)."""
        await self.record_instances(records)
        sops = [r.info.sop_instance_uid for r in records]
        study = records[0].info.study_uid if records else None
        async with self.db.transaction() as tx:
            await tx.execute(
                """INSERT INTO transfers (id, direction, partner, study_uid, state, created_at, updated_at)
                   VALUES (?, 'out', ?, ?, ?, ?, ?)""",
                (transfer_id, partner, study, TransferState.PENDING.value, now, now),
            )
            for sop in dict.fromkeys(sops):
                await tx.execute(
                    "INSERT INTO transfer_items (transfer_id, sop_uid) VALUES (?, ?)", (transfer_id, sop)
                )
            total = await self._count_items(tx, transfer_id)
        return total

    async def transfers_in_state(self, direction: str, state: TransferState) -> list[dict[str, Any]]:
        """Transfers of one direction in one state, oldest first."""
        rows = await self.db.fetchall(
            "SELECT id, partner, study_uid, parts_total, parts_done FROM transfers WHERE direction = ? AND state = ? ORDER BY created_at",
            (direction, state.value),
        )
        return [
            dict(zip(("id", "partner", "study_uid", "parts_total", "parts_done"), r, strict=True))
            for r in rows
        ]

    async def transfer(self, transfer_id: str) -> dict[str, Any] | None:
        """One transfer row as a dict."""
        row = await self.db.fetchone(
            "SELECT id, direction, partner, study_uid, state, parts_total, parts_done, instance_count, bytes, created_at, updated_at, error "
            "FROM transfers WHERE id = ?",
            (transfer_id,),
        )
        keys = (
            "id",
            "direction",
            "partner",
            "study_uid",
            "state",
            "parts_total",
            "parts_done",
            "instance_count",
            "bytes",
            "created_at",
            "updated_at",
            "error",
        )
        return dict(zip(keys, row, strict=True)) if row else None

    async def transfer_instances(self, transfer_id: str) -> list[tuple[str, str, int]]:
        """(sop_uid, path, size) of an outbound transfer, in a stable order (series, then path)."""
        rows = await self.db.fetchall(
            """SELECT i.sop_uid, i.path, i.size FROM transfer_items t JOIN instances i ON i.sop_uid = t.sop_uid
               WHERE t.transfer_id = ? ORDER BY i.series_uid, i.path""",
            (transfer_id,),
        )
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def set_transfer_state(
        self, transfer_id: str, new: TransferState, now: float, error: str | None = None
    ) -> None:
        """Move a transfer to a new state (checked against the table)."""
        async with self.db.transaction() as tx:
            await self._move_transfer(tx, transfer_id, new, now, error)

    async def _move_transfer(
        self, tx: Any, transfer_id: str, new: TransferState, now: float, error: str | None = None
    ) -> None:
        rows = await tx.fetchall("SELECT state FROM transfers WHERE id = ?", (transfer_id,))
        if not rows:
            raise KeyError(transfer_id)
        check_transfer(rows[0][0], new)
        await tx.execute(
            "UPDATE transfers SET state = ?, updated_at = ?, error = ? WHERE id = ?",
            (new.value, now, error, transfer_id),
        )

    async def add_out_mails(
        self,
        transfer_id: str,
        mails: list[tuple[str, int, int, str, int]],
        now: float,
        *,
        mdn_ids: list[str] | None = None,
        receipts: bool = False,
        bytes_wire: int | None = None,
    ) -> None:
        """Record the built mails (id, part, total, path, size) and mark the transfer packaged, atomically.

        `mdn_ids` (one per mail) are the Message-IDs receipts will name; `receipts` says whether they are awaited.
        """
        async with self.db.transaction() as tx:
            await tx.execute("DELETE FROM mails WHERE transfer_id = ? AND direction = 'out'", (transfer_id,))
            for n, (mail_id, part, total, path, size) in enumerate(mails):
                await tx.execute(
                    """INSERT INTO mails (id, direction, transfer_id, part, total, state, path, size, created_at,
                       updated_at, mdn_id) VALUES (?, 'out', ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        mail_id,
                        transfer_id,
                        part,
                        total,
                        MailState.QUEUED.value,
                        path,
                        size,
                        now,
                        now,
                        mdn_ids[n] if mdn_ids else mail_id,
                    ),
                )
            await tx.execute(
                "UPDATE transfers SET parts_total = ?, receipt = ?, bytes_wire = ? WHERE id = ?",
                (len(mails), "awaited" if receipts else "not-requested", bytes_wire, transfer_id),
            )
            await self._move_transfer(tx, transfer_id, TransferState.PACKAGED, now)

    # ----------------------------------------------------------------------------- receipts
    async def record_receipt(
        self, partner: str, original_message_id: str, outcome: str, detail: str, now: float
    ) -> ReceiptMatch:
        """A partner's verified MDN for one of our mails.

        It counts only for a mail we sent to that same partner (`transfer_id` None otherwise: the caller sets it
        aside). A mail's final receipt stands (`core.states.settle_receipt`): a replay changes nothing, a
        different later answer is recorded as a contradiction beside the first and never replaces it. The
        transfer's receipt becomes `failed` as soon as one mail failed at the partner, `confirmed` (or
        `warning`) when every mail of it has a positive receipt.
        """
        async with self.db.transaction() as tx:
            rows = await tx.fetchall(
                """SELECT m.transfer_id, m.receipt, m.part FROM mails m JOIN transfers t ON t.id = m.transfer_id
                   WHERE m.direction = 'out' AND m.mdn_id = ? AND t.partner = ?""",
                (original_message_id, partner),
            )
            if not rows or rows[0][0] is None:
                return ReceiptMatch(None)
            transfer_id = str(rows[0][0])
            kept, contradicts = settle_receipt(rows[0][1], outcome)
            if contradicts:
                note = (
                    f"mail {rows[0][2]}: the partner said {kept}, a later receipt says {outcome}"
                    f"{': ' + detail if detail else ''}"
                )[:1000]
                await tx.execute(
                    "UPDATE transfers SET receipt_conflict = ?, receipt_at = ? WHERE id = ?",
                    (note, now, transfer_id),
                )
                return ReceiptMatch(transfer_id, contradiction=note)
            if kept == rows[0][1]:
                return ReceiptMatch(transfer_id, replay=True)
            await tx.execute(
                "UPDATE mails SET receipt = ?, receipt_detail = ? WHERE direction = 'out' AND mdn_id = ?",
                (outcome, detail[:1000] or None, original_message_id),
            )
            marks = await tx.fetchall(
                "SELECT mdn_id, receipt, receipt_detail, part FROM mails WHERE direction = 'out' AND transfer_id = ?",
                (transfer_id,),
            )
            by_id: dict[str, tuple[str | None, str | None, int]] = {}
            for mdn_id, receipt, receipt_detail, part in marks:
                by_id[str(mdn_id)] = (receipt, receipt_detail, int(part or 0))
            failed = [(p, d) for r, d, p in by_id.values() if r in ("deleted", "deleted/error")]
            warned = [(p, d) for r, d, p in by_id.values() if r == "displayed/warning"]
            if failed:
                part, why = min(failed)
                state, text = "failed", f"mail {part} failed at partner: {why or 'no reason given'}"
            elif all(r is not None for r, _, _ in by_id.values()):
                state, text = (
                    ("warning", "; ".join(sorted({d or "" for _, d in warned})))
                    if warned
                    else ("confirmed", "")
                )
            else:
                state, text = "awaited", ""
            await tx.execute(
                "UPDATE transfers SET receipt = ?, receipt_detail = ?, receipt_at = ? WHERE id = ?",
                (state, text[:1000] or None, now, transfer_id),
            )
            return ReceiptMatch(transfer_id)

    async def flag_overdue_receipts(self, deadline: float, now: float) -> int:
        """Sent transfers still without their receipts after `deadline` seconds become `overdue`."""
        return await self.db.execute(
            """UPDATE transfers SET receipt = 'overdue', receipt_detail = ? WHERE direction = 'out'
               AND state = ? AND receipt = 'awaited' AND updated_at < ?""",
            (
                f"no receipt from the partner within {deadline / 3600:g} h",
                TransferState.SENT.value,
                now - deadline,
            ),
        )

    async def queue_receipt_out(
        self,
        receipt_id: str,
        partner: str,
        to_addr: str,
        original_message_id: str,
        outcome: str,
        detail: str,
        now: float,
        *,
        sop_uids: list[str] | None = None,
        wait_for_pacs: bool = False,
        suppressed: bool = False,
    ) -> None:
        """Remember a receipt we owe (idempotent: the first outcome of a mail stands). A `suppressed` one (the
        rate limit of refusals) is recorded and never sent."""
        await self.db.execute(
            f"""{self.db.dialect.insert_ignore} INTO receipts_out (id, partner, to_addr, original_message_id,
                sop_uids, outcome, detail, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                receipt_id,
                partner,
                to_addr,
                original_message_id,
                " ".join(sop_uids or []),
                outcome,
                detail[:1000],
                "suppressed" if suppressed else "waiting" if wait_for_pacs else "due",
                now,
                now,
            ),
        )

    async def negative_receipts_since(self, partner: str, since: float) -> int:
        """How many refusal receipts (deleted, deleted/error) to this partner were queued since then."""
        row = await self.db.fetchone(
            """SELECT COUNT(*) FROM receipts_out WHERE partner = ? AND outcome IN ('deleted', 'deleted/error')
               AND state <> 'suppressed' AND created_at > ?""",
            (partner, since),
        )
        return int(row[0]) if row else 0

    async def receipts_out(self, states: tuple[str, ...]) -> list[dict[str, Any]]:
        """Receipts we owe, in these states."""
        marks = ", ".join("?" for _ in states)
        keys = (
            "id",
            "partner",
            "to_addr",
            "original_message_id",
            "sop_uids",
            "outcome",
            "detail",
            "state",
            "created_at",
        )
        rows = await self.db.fetchall(
            f"SELECT {', '.join(keys)} FROM receipts_out WHERE state IN ({marks}) ORDER BY created_at", states
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def set_receipt_out(
        self, receipt_id: str, state: str, now: float, outcome: str = "", detail: str = ""
    ) -> None:
        """Move a receipt we owe on (and settle its outcome when it waited for the PACS)."""
        if outcome:
            await self.db.execute(
                "UPDATE receipts_out SET state = ?, outcome = ?, detail = ?, updated_at = ? WHERE id = ?",
                (state, outcome, detail[:1000], now, receipt_id),
            )
        else:
            await self.db.execute(
                "UPDATE receipts_out SET state = ?, updated_at = ? WHERE id = ?", (state, now, receipt_id)
            )

    async def forward_outcomes(self, sop_uids: list[str]) -> list[tuple[str, str, int | None, str | None]]:
        """(sop, state, status, error) of every PACS forward of these instances."""
        out: list[tuple[str, str, int | None, str | None]] = []
        for i in range(0, len(sop_uids), 200):
            chunk = sop_uids[i : i + 200]
            marks = ", ".join("?" for _ in chunk)
            rows = await self.db.fetchall(
                f"SELECT sop_uid, state, status, error FROM pacs_forwards WHERE sop_uid IN ({marks})",
                tuple(chunk),
            )
            out += [(str(r[0]), str(r[1]), r[2], r[3]) for r in rows]
        return out

    async def _move_mail(self, tx: Any, mail_id: str, new: MailState) -> str:
        rows = await tx.fetchall("SELECT state, transfer_id FROM mails WHERE id = ?", (mail_id,))
        if not rows:
            raise KeyError(mail_id)
        check_mail(rows[0][0], new)
        return str(rows[0][1]) if rows[0][1] is not None else ""

    async def mark_mail_sent(self, mail_id: str, node: str, now: float) -> bool:
        """Record a 250 for one mail; when it was the last of its transfer, the transfer becomes sent (→ True)."""
        async with self.db.transaction() as tx:
            transfer_id = await self._move_mail(tx, mail_id, MailState.SENT)
            await tx.execute(
                "UPDATE mails SET state = ?, node = ?, updated_at = ?, error = NULL, attempts = attempts + 1 WHERE id = ?",
                (MailState.SENT.value, node, now, mail_id),
            )
            rows = await tx.fetchall(
                "SELECT COUNT(*), SUM(CASE WHEN state = ? THEN 1 ELSE 0 END) FROM mails WHERE transfer_id = ? AND direction = 'out'",
                (MailState.SENT.value, transfer_id),
            )
            total, sent = int(rows[0][0]), int(rows[0][1] or 0)
            await tx.execute(
                "UPDATE transfers SET parts_done = ?, updated_at = ? WHERE id = ?", (sent, now, transfer_id)
            )
            if total and sent == total:
                await self._move_transfer(tx, transfer_id, TransferState.SENT, now)
                return True
        return False

    async def defer_mail(
        self, mail_id: str, attempts: int, next_attempt: float, error: str, now: float
    ) -> None:
        """Record a transient failure; the mail stays queued until `next_attempt`."""
        async with self.db.transaction() as tx:
            await self._move_mail(tx, mail_id, MailState.QUEUED)
            await tx.execute(
                "UPDATE mails SET attempts = ?, next_attempt = ?, error = ?, updated_at = ? WHERE id = ?",
                (attempts, next_attempt, error[:1000], now, mail_id),
            )

    async def fail_mail(self, mail_id: str, error: str, now: float) -> None:
        """Record a permanent failure of a mail; its transfer fails with the same reason."""
        async with self.db.transaction() as tx:
            transfer_id = await self._move_mail(tx, mail_id, MailState.FAILED)
            await tx.execute(
                "UPDATE mails SET state = ?, error = ?, updated_at = ? WHERE id = ?",
                (MailState.FAILED.value, error[:1000], now, mail_id),
            )
            await self._move_transfer(tx, transfer_id, TransferState.FAILED, now, error[:1000])

    async def release_mail(self, mail_id: str, now: float) -> None:
        """An operator released a held mail: outbound failed → queued (its transfer → packaged), inbound → fetched."""
        async with self.db.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT direction, state, transfer_id FROM mails WHERE id = ?", (mail_id,)
            )
            if not rows:
                return
            direction, state, transfer_id = rows[0]
            new = MailState.QUEUED if direction == "out" else MailState.FETCHED
            if state == new.value:
                return
            check_mail(state, new)
            await tx.execute(
                "UPDATE mails SET state = ?, error = NULL, next_attempt = NULL, updated_at = ? WHERE id = ?",
                (new.value, now, mail_id),
            )
            if direction == "out" and transfer_id:
                t = await tx.fetchall("SELECT state FROM transfers WHERE id = ?", (transfer_id,))
                if t and t[0][0] == TransferState.FAILED.value:
                    await self._move_transfer(tx, str(transfer_id), TransferState.PACKAGED, now)

    async def discard_in_mail(self, mail_id: str, now: float) -> None:
        """An operator discarded a quarantined inbound mail: its record stays, as `discarded`."""
        async with self.db.transaction() as tx:
            rows = await tx.fetchall("SELECT state FROM mails WHERE id = ? AND direction = 'in'", (mail_id,))
            if not rows or rows[0][0] == MailState.DISCARDED.value:
                return
            check_mail(rows[0][0], MailState.DISCARDED)
            await tx.execute(
                "UPDATE mails SET state = ?, updated_at = ? WHERE id = ?",
                (MailState.DISCARDED.value, now, mail_id),
            )

    # ----------------------------------------------------------------------------- inbound
    async def record_in_mail(self, mail_id: str, path: str, size: int, now: float) -> bool:
        """Register a fetched mail (idempotent); True if it was new."""
        return bool(
            await self.db.execute(
                f"""{self.db.dialect.insert_ignore} INTO mails (id, direction, state, path, size, created_at, updated_at)
                   VALUES (?, 'in', ?, ?, ?, ?, ?)""",
                (mail_id, MailState.FETCHED.value, path, size, now, now),
            )
        )

    async def in_part_done(self, transfer_id: str, part: int) -> bool:
        """True if this part of this inbound transfer was already ingested (a re-delivery)."""
        row = await self.db.fetchone(
            "SELECT COUNT(*) FROM mails WHERE direction = 'in' AND transfer_id = ? AND part = ? AND state = ?",
            (transfer_id, part, MailState.INGESTED.value),
        )
        return bool(row and row[0])

    async def finish_in_mail(
        self,
        mail_id: str,
        new: MailState,
        now: float,
        *,
        transfer_id: str | None = None,
        partner: str | None = None,
        study_uid: str | None = None,
        part: int | None = None,
        total: int | None = None,
        instances: int = 0,
        size: int = 0,
        error: str | None = None,
    ) -> bool:
        """Close an inbound mail; for an ingested one, count it into its transfer. True if the transfer completed."""
        completed = False
        async with self.db.transaction() as tx:
            await self._move_mail(tx, mail_id, new)
            await tx.execute(
                "UPDATE mails SET state = ?, transfer_id = ?, part = ?, total = ?, error = ?, updated_at = ? WHERE id = ?",
                (new.value, transfer_id, part, total, (error or "")[:1000] or None, now, mail_id),
            )
            if new is MailState.INGESTED and transfer_id is not None and partner is not None:
                await tx.execute(
                    f"""{self.db.dialect.insert_ignore} INTO transfers
                        (id, direction, partner, study_uid, state, parts_total, created_at, updated_at)
                        VALUES (?, 'in', ?, ?, ?, ?, ?, ?)""",
                    (transfer_id, partner, study_uid, TransferState.RECEIVING.value, total, now, now),
                )
                rows = await tx.fetchall(
                    "SELECT COUNT(DISTINCT part) FROM mails WHERE direction = 'in' AND transfer_id = ? AND state = ?",
                    (transfer_id, MailState.INGESTED.value),
                )
                done = int(rows[0][0])
                await tx.execute(
                    """UPDATE transfers SET parts_done = ?, instance_count = instance_count + ?, bytes = bytes + ?,
                       updated_at = ? WHERE id = ?""",
                    (done, instances, size, now, transfer_id),
                )
                state = await tx.fetchall("SELECT state FROM transfers WHERE id = ?", (transfer_id,))
                if total and done >= total and state[0][0] == TransferState.RECEIVING.value:
                    await self._move_transfer(tx, transfer_id, TransferState.COMPLETE, now)
                    completed = True
        return completed

    # ----------------------------------------------------------------------------- PACS forwarding
    async def queue_forwards(self, sop_uids: list[str], pacs_names: list[str], now: float) -> None:
        """Every instance goes to every configured PACS (idempotent)."""
        async with self.db.transaction() as tx:
            for sop in sop_uids:
                for pacs in pacs_names:
                    await tx.execute(
                        f"""{self.db.dialect.insert_ignore} INTO pacs_forwards
                            (sop_uid, pacs, state, created_at, updated_at) VALUES (?, ?, 'pending', ?, ?)""",
                        (sop, pacs, now, now),
                    )

    async def due_forwards(self, now: float, limit: int = 200) -> list[dict[str, Any]]:
        """Forwards to try now, with what the SCU needs to propose and send."""
        rows = await self.db.fetchall(
            """SELECT f.sop_uid, f.pacs, f.attempts, i.sop_class_uid, i.transfer_syntax, i.path
               FROM pacs_forwards f JOIN instances i ON i.sop_uid = f.sop_uid
               WHERE f.state IN ('pending', 'retry') AND (f.next_attempt IS NULL OR f.next_attempt <= ?)
               ORDER BY f.created_at, i.series_uid, i.path LIMIT ?""",
            (now, limit),
        )
        keys = ("sop_uid", "pacs", "attempts", "sop_class_uid", "transfer_syntax", "path")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def record_forward(
        self,
        sop_uid: str,
        pacs: str,
        state: str,
        attempts: int,
        now: float,
        *,
        status: int | None = None,
        next_attempt: float | None = None,
        error: str | None = None,
    ) -> None:
        """The outcome of one forward: accepted, retry (with next_attempt) or rejected (for good)."""
        await self.db.execute(
            """UPDATE pacs_forwards SET state = ?, attempts = ?, status = ?, next_attempt = ?, error = ?, updated_at = ?
               WHERE sop_uid = ? AND pacs = ?""",
            (state, attempts, status, next_attempt, (error or "")[:1000] or None, now, sop_uid, pacs),
        )

    async def purgeable(
        self, pacs_count: int, accepted_before: float, limit: int = 1000
    ) -> list[tuple[str, str]]:
        """(sop_uid, path) of stored instances that every one of `pacs_count` PACS accepted before the cut-off."""
        rows = await self.db.fetchall(
            """SELECT f.sop_uid, i.path FROM pacs_forwards f JOIN instances i ON i.sop_uid = f.sop_uid
               WHERE i.purged_at IS NULL GROUP BY f.sop_uid, i.path
               HAVING SUM(CASE WHEN f.state = 'accepted' THEN 1 ELSE 0 END) = COUNT(*) AND COUNT(*) >= ?
                  AND MAX(f.updated_at) < ? LIMIT ?""",
            (pacs_count, accepted_before, limit),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def mark_purged(self, sop_uid: str, now: float) -> None:
        """The instance's file is (about to be) removed; its row stays as history."""
        await self.db.execute("UPDATE instances SET purged_at = ? WHERE sop_uid = ?", (now, sop_uid))

    # ----------------------------------------------------------------------------- status
    async def status(self, limit: int = 50) -> dict[str, Any]:
        """Counts and the most recent transfers and studies, for `status` (no patient data is stored at all)."""
        counts = await self.db.fetchall(
            "SELECT direction, state, COUNT(*) FROM transfers GROUP BY direction, state"
        )
        mails = await self.db.fetchall(
            "SELECT direction, state, COUNT(*) FROM mails GROUP BY direction, state"
        )
        transfers = await self.db.fetchall(
            """SELECT id, direction, partner, study_uid, state, parts_done, parts_total, instance_count, bytes,
                      created_at, updated_at, error, receipt, receipt_detail, bytes_wire, receipt_conflict
               FROM transfers ORDER BY updated_at DESC LIMIT ?""",
            (limit,),
        )
        studies = await self.db.fetchall(
            """SELECT s.study_uid, COUNT(i.sop_uid), COUNT(DISTINCT i.series_uid), COALESCE(SUM(i.size), 0),
                      MIN(i.source), s.last_received
               FROM studies s JOIN instances i ON i.study_uid = s.study_uid
               GROUP BY s.study_uid, s.last_received ORDER BY s.last_received DESC LIMIT ?""",
            (limit,),
        )
        forwards = await self.db.fetchall(
            "SELECT pacs, state, COUNT(*) FROM pacs_forwards GROUP BY pacs, state"
        )
        tkeys = (
            "id",
            "direction",
            "partner",
            "study_uid",
            "state",
            "parts_done",
            "parts_total",
            "instances",
            "bytes",
            "created_at",
            "updated_at",
            "error",
            "receipt",
            "receipt_detail",
            "bytes_wire",
            "receipt_conflict",
        )
        receipts = await self.db.fetchall(
            "SELECT state, outcome, COUNT(*) FROM receipts_out GROUP BY state, outcome"
        )
        skeys = ("study_uid", "instances", "series", "bytes", "source", "last_received")
        listed = [dict(zip(tkeys, r, strict=True)) for r in transfers]
        inbound = [str(t["id"]) for t in listed if t["direction"] == "in"]
        per_transfer: dict[str, list[dict[str, Any]]] = {}
        if inbound:
            marks = ", ".join("?" for _ in inbound)
            for tid, pacs, state, count, error in await self.db.fetchall(
                f"""SELECT i.in_transfer, f.pacs, f.state, COUNT(*), MAX(f.error) FROM pacs_forwards f
                    JOIN instances i ON i.sop_uid = f.sop_uid WHERE i.in_transfer IN ({marks})
                    GROUP BY i.in_transfer, f.pacs, f.state ORDER BY f.pacs, f.state""",
                inbound,
            ):
                per_transfer.setdefault(str(tid), []).append(
                    {"pacs": pacs, "state": state, "count": int(count), "error": error}
                )
        for t in listed:
            t["pacs"] = per_transfer.get(str(t["id"]), [])
        return {
            "transfers_by_state": [{"direction": d, "state": s, "count": int(c)} for d, s, c in counts],
            "mails_by_state": [{"direction": d, "state": s, "count": int(c)} for d, s, c in mails],
            "transfers": listed,
            "studies": [dict(zip(skeys, r, strict=True)) for r in studies],
            "pacs_forwards": [{"pacs": p, "state": st, "count": int(c)} for p, st, c in forwards],
            "receipts_out": [{"state": st, "outcome": o, "count": int(c)} for st, o, c in receipts],
        }


async def open_catalog(url: str) -> Catalog:
    """Connect, migrate, return the catalog."""
    catalog = Catalog(await connect(url))
    await catalog.migrate()
    return catalog
