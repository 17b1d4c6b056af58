"""Reading TOML tables with checks: every value is typed and checked where it is read, every error names the file
and the dotted key, and a key nobody read is refused as a typo."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.config.model import FileRef, Node
from gateway.errors import ConfigError

T = TypeVar("T")

_AE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*$")
_ADDR_RE = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")


class Reader:
    """Walks one TOML table, remembering which keys were read so unknown ones can be refused."""

    def __init__(
        self,
        file: Path,
        prefix: str,
        table: dict[str, Any],
        refs: list[FileRef] | None = None,
        where: tuple[str | int, ...] = (),
    ) -> None:
        self.file = file
        self.prefix = prefix
        self.table = table
        self.seen: set[str] = set()
        self.refs: list[FileRef] = [] if refs is None else refs  # every file the configuration names
        self.where = where  # this table's place in the document

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(str(self.file), self.key(name), problem)

    def get(
        self,
        name: str,
        kind: type[T] | tuple[type, ...],
        default: Any = ...,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        self.seen.add(name)
        if name not in self.table:
            if default is ...:
                raise self.fail(name, "missing (required)")
            return default
        value = self.table[name]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.fail(name, f"must be a number, not {value!r}")
        if not isinstance(value, kind):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(name, f"must be {want}, not {type(value).__name__}")
        if check is not None and (problem := check(value)) is not None:
            raise self.fail(name, problem)
        return value

    def path(self, name: str, default: Any = ..., must_exist: bool = True) -> Path:
        raw = self.get(name, str, default)
        p = Path(raw)
        if not p.is_absolute():
            p = (self.file.parent / p).resolve()
        if must_exist and not p.exists():
            raise self.fail(name, f"file not found: {p}")
        if must_exist:
            self.refs.append(FileRef((*self.where, name), p))
        return p

    def within(self, name: str | int, prefix: str, table: dict[str, Any]) -> Reader:
        """A reader for a table inside this one (sharing the record of file references)."""
        return Reader(self.file, prefix, table, self.refs, (*self.where, name))

    def table_of(self, name: str, required: bool = True) -> Reader:
        self.seen.add(name)
        value = self.table.get(name)
        if value is None:
            if required:
                raise self.fail(name, "missing section")
            value = {}
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table")
        return self.within(name, self.key(name), value)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self.fail(unknown[0], "unknown key (typo?)")


def parse_size(text: str | int) -> int:
    """'20MB' / '512k' / 1048576 → bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(float(m.group(1)) * factor)


def check_ae(value: str) -> str | None:
    return (
        None
        if _AE_RE.match(value) and value == value.strip()
        else "not a valid AE title (1-16 chars, no backslash)"
    )


def check_name(value: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value) else "use letters, digits, . _ -"


def check_addr(value: str) -> str | None:
    return None if _ADDR_RE.match(value) else "not a mail address"


def check_positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def nodes(r: Reader, name: str, default_port: int) -> tuple[Node, ...]:
    raw = r.get(name, list)
    if not raw:
        raise r.fail(name, "needs at least one node")
    nodes = []
    for item in raw:
        if not isinstance(item, str) or not item.strip():
            raise r.fail(name, f"entry {item!r} is not 'host' or 'host:port'")
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not port.isdigit() or not (0 < int(port) < 65536):
            if port:
                raise r.fail(name, f"entry {item!r} has a bad port")
            port = str(default_port)
        nodes.append(Node(host, int(port)))
    return tuple(nodes)


def parse_size_key(r: Reader, name: str, default: str) -> int:
    raw = r.get(name, (str, int), default)
    try:
        size = parse_size(raw)
    except ValueError as exc:
        raise r.fail(name, str(exc)) from None
    if size < 64 * 1024:
        raise r.fail(name, "must be at least 64KB")
    return size
