"""Consistent snapshots of every table (for backups) and loading them back (for restores).

A snapshot is one JSON-lines file per table of `schema.TABLES` (derived from the migrations, so a new table can
never be left out), all read inside one read transaction: SQLite's WAL lets writers go on, MariaDB's consistent
snapshot is what `mariadb-dump --single-transaction` does.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from gateway.catalog.base import CatalogBase
from gateway.catalog.db import MysqlTarget, plain
from gateway.catalog.schema import TABLES


def _write_rows(folder: Path, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> int:
    with (folder / f"{table}.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(
                json.dumps(dict(zip(columns, (plain(v) for v in row), strict=True)), separators=(",", ":"))
            )
            f.write("\n")
    return len(rows)


def sqlite_snapshot(db_path: Path, folder: Path, file_copy: Path) -> tuple[int, dict[str, int]]:
    """All tables from one read transaction (WAL: writers go on), plus a copy via the online backup API."""
    con = sqlite3.connect(str(db_path))
    try:
        con.execute("BEGIN")
        version = int(con.execute("SELECT version FROM schema_version").fetchone()[0])
        counts = {}
        for table in TABLES:
            cur = con.execute(f"SELECT * FROM {table}")
            counts[table] = _write_rows(folder, table, [d[0] for d in cur.description], cur.fetchall())
        con.execute("COMMIT")
        dst = sqlite3.connect(str(file_copy))
        try:
            con.backup(dst)
        finally:
            dst.close()
    finally:
        con.close()
    return version, counts


async def mysql_snapshot(url: str, folder: Path) -> tuple[int, dict[str, int]]:
    """All tables from one consistent InnoDB snapshot (the equivalent of mariadb-dump --single-transaction), on the
    first of the URL's members that serves queries (a Galera member: after everything committed before it)."""
    target = MysqlTarget.parse(url)
    conn = await target.connect_any(target.database)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            await cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            await cur.execute("SELECT version FROM schema_version")
            version = int((await cur.fetchone())[0])
            counts = {}
            for table in TABLES:
                await cur.execute(f"SELECT * FROM {table}")
                columns = [d[0] for d in cur.description]
                rows = list(await cur.fetchall())
                counts[table] = await asyncio.to_thread(_write_rows, folder, table, columns, rows)
            await cur.execute("COMMIT")
    finally:
        conn.close()
    return version, counts


class SnapshotRoom(CatalogBase):
    """Restore's side: is the target empty, and load rows back in one transaction."""

    async def first_table_with_rows(self) -> str | None:
        for table in TABLES:
            row = await self.db.fetchone(f"SELECT COUNT(*) FROM {table}")
            if row and row[0]:
                return table
        return None

    async def load_rows(self, rows_by_table: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
        """Insert every row, all tables in one transaction; return the count per table."""
        counts: dict[str, int] = {}
        async with self.db.transaction() as tx:
            for table in TABLES:
                for record in rows_by_table.get(table, []):
                    cols = list(record)
                    await tx.execute(
                        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                        [record[c] for c in cols],
                    )
                counts[table] = len(rows_by_table.get(table, []))
        return counts
