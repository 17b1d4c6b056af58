"""The database seam: SQLite (aiosqlite, the embedded default) and MariaDB/MySQL (aiomysql), one interface.

SQL is written once with `?` placeholders; the MySQL backend rewrites them to `%s`. Differences between the
dialects are confined to `Dialect`. SQLite runs in WAL mode with `synchronous=FULL`: a committed row survives
a power loss, which is what "acknowledged" means here.
"""

from __future__ import annotations

import asyncio
import decimal
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Row = tuple[Any, ...]


class Tx(Protocol):
    """Statements inside one transaction."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...


@dataclass(frozen=True)
class Dialect:
    """What differs between the SQL dialects."""

    name: str
    insert_ignore: str  # "INSERT OR IGNORE" / "INSERT IGNORE"


SQLITE = Dialect("sqlite", "INSERT OR IGNORE")
MYSQL = Dialect("mysql", "INSERT IGNORE")


CONFLICT_CODES = frozenset(
    {1062, 1205, 1213}
)  # MySQL: duplicate key, lock wait timeout, deadlock/certification


def is_conflict(exc: BaseException) -> bool:
    """True when a transaction failed because another one changed the same rows first: a duplicate key (both
    inserted), a lock wait or deadlock, or, on Galera, a certification failure at commit (1213) when the other
    writer was on another member. The transaction was rolled back; nothing it wrote counts."""
    import sqlite3

    if isinstance(exc, sqlite3.IntegrityError):
        return True
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    return type(exc).__module__.startswith("pymysql") and len(args) > 0 and args[0] in CONFLICT_CODES


class Database:
    """Base of both backends."""

    dialect: Dialect

    def transaction(self) -> Any:  # an async context manager yielding a `Tx`
        raise NotImplementedError

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self.transaction() as tx:
            return int(await tx.execute(sql, params))

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self.transaction() as tx:
            return list(await tx.fetchall(sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def close(self) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    """One aiosqlite connection; transactions are serialised with a lock (SQLite has one writer anyway)."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        import aiosqlite

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await aiosqlite.connect(str(self.path), isolation_level=None)
        await self._conn.execute("PRAGMA journal_mode=WAL")
        await self._conn.execute("PRAGMA synchronous=FULL")
        await self._conn.execute("PRAGMA busy_timeout=10000")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        conn = self._conn

        class _Tx:
            async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
                cur = await conn.execute(sql, tuple(params))
                return int(cur.rowcount)

            async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
                cur = await conn.execute(sql, tuple(params))
                return [tuple(r) for r in await cur.fetchall()]

        async with self._lock:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx()
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """A read on its own: one statement in autocommit mode is a consistent snapshot in WAL mode, so it needs
        neither BEGIN IMMEDIATE (the write lock) nor COMMIT: one hop to the connection's thread instead of four."""
        async with self._lock:
            return [tuple(r) for r in await self._conn.execute_fetchall(sql, tuple(params))]

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def plain(value: Any) -> Any:
    """MySQL returns SUM/COUNT arithmetic as Decimal; SQLite returns int/float. Make both look alike."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


class MysqlDatabase(Database):
    """An aiomysql pool; every transaction takes a connection, runs, commits or rolls back."""

    dialect = MYSQL

    def __init__(self, url: str) -> None:
        u = urllib.parse.urlsplit(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 3306
        self.user = urllib.parse.unquote(u.username or "root")
        self.password = urllib.parse.unquote(u.password or "")
        self.database = u.path.lstrip("/") or "dicom_mail_gateway"
        if not self.database.replace("_", "").isalnum():
            raise ValueError("database name: letters, digits and _ only")
        self._pool: Any = None

    async def open(self) -> None:
        import warnings

        import aiomysql
        import pymysql

        # INSERT IGNORE of a known row is how indexing stays idempotent; MySQL's warning about it is noise.
        warnings.filterwarnings("ignore", category=pymysql.Warning)

        # Create the database on first start (needs the privilege; otherwise create it by hand).
        conn = await aiomysql.connect(host=self.host, port=self.port, user=self.user, password=self.password)
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}` CHARACTER SET utf8mb4")
                await cur.execute("SHOW VARIABLES LIKE 'wsrep_on'")
                wsrep = [str(v).upper() for _, v in await cur.fetchall()] == ["ON"]
        finally:
            conn.close()
        # On a Galera member, a read waits until the member has applied everything committed anywhere before it
        # (Galera certifies synchronously but applies asynchronously): what one gateway node recorded on its
        # member, another node reads on its own member at once, as on a single server.
        init = "SET SESSION wsrep_sync_wait = 1" if wsrep else None
        self._pool = await aiomysql.create_pool(
            init_command=init,
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            db=self.database,
            autocommit=False,
            minsize=1,
            maxsize=5,
            pool_recycle=3600,
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._pool.acquire() as conn, conn.cursor() as cur:

            class _Tx:
                async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
                    return int(await cur.execute(sql.replace("?", "%s"), tuple(params)))

                async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
                    await cur.execute(sql.replace("?", "%s"), tuple(params))
                    return [tuple(plain(v) for v in r) for r in await cur.fetchall()]

            try:
                yield _Tx()
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            await self._pool.wait_closed()
            self._pool = None


async def connect(url: str) -> Database:
    """Open the database named by a `sqlite:///path` or `mysql://user:pass@host:port/db` URL."""
    db: SqliteDatabase | MysqlDatabase
    if url.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path
        db = SqliteDatabase(Path(url[len("sqlite:///") :]))
    elif url.startswith("mysql://"):
        db = MysqlDatabase(url)
    else:
        raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")
    await db.open()
    return db
