"""The house rules of the source tree, checked from the code itself (fast, no peers).

- no import circle inside ``gateway`` (lazy imports inside functions count too: a circle that only closes at run
  time is still a circle a reader has to untangle);
- the pure core, the stages and the protocol adapters never import the outer rooms (CLI, service, web page);
- SQL is written only inside the catalog package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "gateway"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``gateway`` this module imports, at the top or inside functions (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                for sub in ast.walk(inner):
                    typing_only.add(id(sub))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            # a package importing its own submodules (``gateway.catalog`` → ``gateway.catalog.schema``) is how
            # packages are built, not a circle; a submodule importing its package is counted
            if w.startswith(v + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_there_is_no_import_circle_in_the_gateway() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_sees_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


OUTER = ("gateway.cli", "gateway.service", "gateway.web", "gateway.__main__")
INNER = ("gateway.core", "gateway.stages", "gateway.adapters", "gateway.catalog")


def test_inner_rooms_never_import_the_outer_ones() -> None:
    wrong = []
    for name, targets in _graph().items():
        if name.startswith(INNER):
            wrong += [f"{name} -> {t}" for t in sorted(targets) if t.startswith(OUTER)]
    assert wrong == []


def test_the_pure_core_imports_no_adapter_stage_or_catalog() -> None:
    wrong = []
    for name, targets in _graph().items():
        if name.startswith("gateway.core"):
            bad = (
                "gateway.adapters",
                "gateway.stages",
                "gateway.catalog",
                "gateway.storage",
                "gateway.spool",
            )
            wrong += [f"{name} -> {t}" for t in sorted(targets) if t.startswith(bad)]
    assert wrong == []


_SQL = re.compile(
    r"^\s*(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+TABLE|ALTER\s+TABLE|DROP\s+TABLE)\b",
    re.IGNORECASE | re.DOTALL,
)


def _sql_strings(path: Path) -> list[str]:
    where = path.relative_to(ROOT.parent) if path.is_relative_to(ROOT.parent) else path.name
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL.match(node.value):
            out.append(f"{where}:{node.lineno}")
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
            )
            if _SQL.match(text):
                out.append(f"{where}:{node.lineno}")
    return sorted(set(out), key=lambda s: int(s.rsplit(":", 1)[1]))


def test_sql_is_written_only_in_the_catalog_package() -> None:
    outside = []
    for name, path in _modules().items():
        if name.startswith("gateway.catalog") or name.startswith("gateway.devtools"):
            continue
        outside += _sql_strings(path)
    assert outside == []


def test_the_sql_finder_sees_sql(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text(
        'a = "SELECT id FROM mails WHERE x = ?"\nb = f"DELETE FROM {t}"\nc = "select the best"\n'
    )
    assert [s.rsplit(":", 1)[1] for s in _sql_strings(sample)] == ["1", "2"]


def _private_uses(name: str, path: Path, known: set[str]) -> list[str]:
    """`from gateway.x import _y` and `x._y` where `x` is a gateway module imported by this one."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gateway"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in known:
                    aliases[a.asname or a.name] = full
                elif a.name.startswith("_") and node.module != name:
                    out.append(f"{name}: from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            out.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return out


def test_no_module_uses_another_modules_private_names() -> None:
    modules = _modules()
    known = set(modules)
    found = []
    for name, path in modules.items():
        found += _private_uses(name, path, known)
    assert found == []


MODULE_LINES, FUNCTION_LINES = 450, 60


def test_no_big_room_without_a_reason() -> None:
    """No module over ~400 lines and no function over 60 without a `Size:` reason in its docstring."""
    unexplained = []
    for name, path in _modules().items():
        source = path.read_text()
        tree = ast.parse(source)
        if len(source.splitlines()) > MODULE_LINES and "Size:" not in (ast.get_docstring(tree) or ""):
            unexplained.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > FUNCTION_LINES and "Size:" not in (ast.get_docstring(node) or ""):
                    unexplained.append(f"{name}.{node.name}: {length} lines")
    assert unexplained == []
