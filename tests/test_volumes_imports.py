"""The volume layer's modules import each other without a circle (issue 9,
section 1): every import counts, at module level, inside a function or under
TYPE_CHECKING alike."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "opie.head.volumes"
ROOT = Path(__file__).resolve().parent.parent / "head" / "volumes"


def imports_of(path: Path) -> set[str]:
    """The modules of this package that `path` imports anywhere."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n.removeprefix(PACKAGE + ".").split(".")[0] for n in names
                if n.startswith(PACKAGE + ".")}
    return out


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in ROOT.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Modules `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(edges[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += edges[m]
    return seen


def test_volume_modules_have_no_import_circle() -> None:
    edges = graph()
    assert "pool" not in edges["volume"], "volume.py imports pool.py"
    circular = sorted(m for m in edges if m in reachable(edges, m))
    assert circular == [], f"modules on an import circle: {circular}"
