"""No import circles inside opie.shares: every import counts, module level,
function level and under TYPE_CHECKING alike (issue 9, section 1)."""
from __future__ import annotations

import ast
from pathlib import Path

SHARES = Path(__file__).resolve().parent.parent / "shares"
PACKAGE = "opie.shares"


def imported_modules(path: Path) -> set[str]:
    """The opie.shares modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith(PACKAGE + ".") and n.count(".") == 2}
    return found


def graph() -> dict[str, set[str]]:
    modules = {f"{PACKAGE}.{p.stem}": p for p in SHARES.glob("*.py") if p.stem != "__init__"}
    return {name: imported_modules(path) & set(modules) - {name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with one path that does."""
    found = []
    for start in sorted(edges):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges[node]):
                if nxt == start:
                    found.append(path + [start])
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_the_cycle_finder_sees_function_level_imports(tmp_path: Path) -> None:
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"], ["b", "a", "b"]]
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from opie.shares.smbd import SmbdRunner\n")
    assert imported_modules(mod) == {"opie.shares.smbd"}


def test_no_import_cycles_between_shares_modules() -> None:
    assert cycles(graph()) == []
