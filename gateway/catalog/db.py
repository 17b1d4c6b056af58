"""The database seam: SQLite (aiosqlite, the embedded default) and MariaDB/MySQL (aiomysql), one interface.

SQL is written once with `?` placeholders; the MySQL backend rewrites them to `%s`. Differences between the
dialects are confined to `Dialect`. SQLite runs in WAL mode with `synchronous=FULL`: a committed row survives
a power loss, which is what "acknowledged" means here.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Row = tuple[Any, ...]
log = logging.getLogger(__name__)


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

    @property
    def member_address(self) -> str:
        """The server in use, where there may be several (Galera members)."""
        return ""

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


@dataclass(frozen=True)
class MysqlTarget:
    """A `mysql://user:password@host:port[,host:port…]/database` URL: one server, or the members of a Galera
    cluster in the order this gateway prefers them (the member on its own machine first)."""

    members: tuple[tuple[str, int], ...]
    user: str
    password: str
    database: str

    @classmethod
    def parse(cls, url: str) -> MysqlTarget:
        if not url.startswith("mysql://"):
            raise ValueError("a MariaDB URL starts with mysql://")
        netloc, _, path = url[len("mysql://") :].partition("/")
        credentials, _, hosts = netloc.rpartition("@")
        user, _, password = credentials.partition(":")
        members = tuple(_member(h.strip()) for h in hosts.split(",")) if hosts else (("127.0.0.1", 3306),)
        database = path.partition("?")[0] or "dicom_mail_gateway"
        if not database.replace("_", "").isalnum():
            raise ValueError("database name: letters, digits and _ only")
        return cls(members, urllib.parse.unquote(user or "root"), urllib.parse.unquote(password), database)

    def address(self, index: int) -> str:
        host, port = self.members[index]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def connect(self, index: int, database: str | None = None) -> Any:
        """A connection to one member; its `wsrep_on` and whether it serves queries now (a Galera member must be
        synced in the Primary Component: a donor, a joiner or a minority member is passed over)."""
        import aiomysql

        host, port = self.members[index]
        conn = await aiomysql.connect(
            host=host, port=port, user=self.user, password=self.password, db=database, connect_timeout=5
        )
        try:
            async with conn.cursor() as cur:
                await cur.execute("SHOW VARIABLES LIKE 'wsrep_on'")
                wsrep = [str(v).upper() for _, v in await cur.fetchall()] == ["ON"]
                ready = True
                if wsrep:
                    await cur.execute(
                        "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_local_state_comment')"
                    )
                    status = {str(k): str(v) for k, v in await cur.fetchall()}
                    ready = (
                        status.get("wsrep_ready") == "ON"
                        and status.get("wsrep_local_state_comment") == "Synced"
                    )
                    # what one gateway node recorded on its member, a read on another member sees at once
                    await cur.execute("SET SESSION wsrep_sync_wait = 1")
        except BaseException:
            conn.close()
            raise
        return conn, wsrep, ready

    async def connect_any(self, database: str | None = None) -> Any:
        """A connection to the first member, in the URL's order, that serves queries now (for one-off work such
        as the backup's snapshot); the last member's error if none does."""
        error: BaseException = ConnectionError("no member")
        for index in range(len(self.members)):
            try:
                conn, _, ready = await self.connect(index, database)
            except Exception as exc:  # refused, unreachable, denied: try the next member
                error = exc
                continue
            if ready:
                return conn
            conn.close()
            error = ConnectionError(f"catalog member {self.address(index)} is not synced")
        raise error


def _member(text: str) -> tuple[str, int]:
    host, port = text, ""
    if text.startswith("["):  # [::1]:3306
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not port.isdigit() and port:
        raise ValueError(f"database URL: {text!r} is not host:port")
    return host or "127.0.0.1", int(port or 3306)


# MySQL errors after which the member in use may be gone: not ready (a Galera minority or joiner: 1047),
# shutting down (1053), connection killed (1927), can't connect (2002, 2003), gone away (2006), lost (2013, 2055)
MEMBER_LOST = frozenset({1047, 1053, 1927, 2002, 2003, 2006, 2013, 2055})
PROBE_PAUSE = 2.0  # seconds between two searches for a working member while none answers
HOME_CHECK = 30.0  # seconds between looks whether a preferred member serves again


class MysqlDatabase(Database):
    """An aiomysql pool on one member; every transaction takes a connection, runs, commits or rolls back.

    With several members in the URL (a Galera cluster), a transaction that finds its member gone (refused, lost,
    not ready) fails as before, and the next one runs on the first member in the URL's order that serves queries;
    every `HOME_CHECK` seconds a member preferred to the one in use is tried again. The transaction that failed is
    not repeated here: it may have committed, and its caller's retry knows whether that is safe.
    """

    dialect = MYSQL

    def __init__(self, url: str) -> None:
        self.target = MysqlTarget.parse(url)
        self.database = self.target.database
        self.member = 0  # index in target.members of the member in use
        self.home_check = HOME_CHECK
        self._pool: Any = None
        self._suspect = False
        self._probed_at = 0.0
        self._home_at = 0.0
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def member_address(self) -> str:
        return self.target.address(self.member)

    async def open(self) -> None:
        import warnings

        import pymysql

        # INSERT IGNORE of a known row is how indexing stays idempotent; MySQL's warning about it is noise.
        warnings.filterwarnings("ignore", category=pymysql.Warning)
        # Create the database on first start (needs the privilege; otherwise create it by hand).
        conn = await self.target.connect_any()
        try:
            async with conn.cursor() as cur:
                await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}` CHARACTER SET utf8mb4")
        finally:
            conn.close()
        self._probed_at = time.monotonic()
        if not await self._move(range(len(self.target.members))):
            raise ConnectionError("no catalog member serves queries")

    async def _move(self, order: Iterable[int]) -> bool:
        """Use the first member of `order` that serves queries; False when none does."""
        for index in order:
            try:
                conn, wsrep, ready = await self.target.connect(index, self.database)
            except Exception as exc:
                log.info("catalog member %s: %s", self.target.address(index), str(exc)[:120])
                continue
            conn.close()
            if not ready:
                log.info("catalog member %s is not synced", self.target.address(index))
                continue
            if index == self.member and self._pool is not None:
                self._suspect = False  # the member in use serves again (a restart, a blip): keep its pool
                return True
            await self._use(index, wsrep)
            return True
        return False

    async def _use(self, index: int, wsrep: bool) -> None:
        import aiomysql

        host, port = self.target.members[index]
        pool = await aiomysql.create_pool(
            # on a Galera member, a read waits until the member has applied everything committed anywhere before
            # it (Galera certifies synchronously but applies asynchronously)
            init_command="SET SESSION wsrep_sync_wait = 1" if wsrep else None,
            host=host,
            port=port,
            user=self.target.user,
            password=self.target.password,
            db=self.database,
            autocommit=False,
            minsize=1,
            maxsize=5,
            pool_recycle=3600,
            connect_timeout=5,
        )
        old, before = self._pool, self.member_address
        self._pool, self.member, self._suspect = pool, index, False
        if old is not None:
            log.warning("catalog: now on member %s (was %s)", self.member_address, before)
            old.close()  # connections still in use close when they come back
            self._spawn(asyncio.wait_for(old.wait_closed(), 120))

    def _spawn(self, work: Awaitable[Any]) -> None:
        async def quietly() -> None:
            with contextlib.suppress(Exception):
                await work

        task = asyncio.get_running_loop().create_task(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _pool_now(self) -> Any:
        now = time.monotonic()
        if self._suspect and now - self._probed_at >= PROBE_PAUSE:
            async with self._lock:
                if self._suspect and time.monotonic() - self._probed_at >= PROBE_PAUSE:
                    self._probed_at = time.monotonic()
                    if not await self._move(range(len(self.target.members))):
                        log.warning("catalog: no member serves queries")
        elif self.member > 0 and now - self._home_at >= self.home_check and not self._lock.locked():
            self._home_at = now
            self._spawn(self._home())
        return self._pool

    async def _home(self) -> None:
        async with self._lock:
            await self._move(range(self.member))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        pool = await self._pool_now()
        try:
            async with pool.acquire() as conn, conn.cursor() as cur:

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
        except Exception as exc:
            args = tuple(getattr(exc, "args", ()))
            if (
                pool is self._pool
                and type(exc).__module__.startswith("pymysql")
                and args
                and args[0] in MEMBER_LOST
            ):
                self._suspect = True  # the next transaction looks for a member that serves
            raise

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
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
