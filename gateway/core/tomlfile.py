"""Writing a TOML document (the standard library only reads TOML): what `restore --config-to` needs to give back
a configuration whose paths point at the restored files. Covers what a gateway configuration holds: tables,
arrays of tables, strings, numbers, booleans, dates and times, and arrays of those."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string (\\uXXXX escapes included)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _table(data: dict[str, Any], path: list[str], out: list[str]) -> None:
    for k, v in data.items():
        if not isinstance(v, dict) and not _is_table_array(v):
            out.append(f"{_key(k)} = {_value(v)}")
    for k, v in data.items():
        if isinstance(v, dict):
            out += ["", f"[{'.'.join(_key(p) for p in [*path, k])}]"]
            _table(v, [*path, k], out)
        elif _is_table_array(v):
            for item in v:
                out += ["", f"[[{'.'.join(_key(p) for p in [*path, k])}]]"]
                _table(item, [*path, k], out)


def dumps(data: dict[str, Any]) -> str:
    """The document as TOML text (comments of a file it was read from are not kept)."""
    out: list[str] = []
    _table(data, [], out)
    return "\n".join(out).lstrip("\n") + "\n"
