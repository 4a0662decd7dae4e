"""Import structure: one namespace, no circles, imports only point down.

Every module's imports are read with ast, at module level and inside
functions and `if TYPE_CHECKING:` blocks alike (an import moved into a
function to dodge a circle is still a circle). A cycle between any two
`opie.*` modules fails, and so does a package importing one above it in
DESIGN.md's order:

    opie (root mechanisms) < nbd, raid5 < discovery < isu < monitor
    < recovery < shares < head < gui < lab < cli

nbd and raid5 share the bottom and import neither each other nor anything
else of Opie; the gui reaches the head only through its API client.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LEVEL = {"": -1, "nbd": 0, "raid5": 0, "discovery": 1, "isu": 2, "monitor": 3, "recovery": 4,
         "shares": 5, "head": 6, "gui": 7, "lab": 8, "cli": 9}
GUI_MAY_USE = {"opie.head.apiclient"}


def package_dirs() -> dict[str, Path]:
    """opie package name -> its directory, from pyproject's package-dir mapping."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg["package-dir"]

    def where(pkg: str) -> Path:  # as setuptools does: the nearest mapped parent, then the rest
        parent, rest = pkg, []
        while parent not in mapping:
            parent, _, last = parent.rpartition(".")
            rest.insert(0, last)
        return ROOT.joinpath(mapping[parent], *rest)

    return {pkg: where(pkg) for pkg in cfg["packages"]}


def modules() -> dict[str, Path]:
    """Every opie module name -> its file."""
    found: dict[str, Path] = {}
    for pkg, d in package_dirs().items():
        for f in sorted(d.glob("*.py")):
            found[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The opie modules that module `name` imports anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "opie" or alias.name.startswith("opie."):
                    out.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not (base == "opie" or base.startswith("opie.")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else resolve(base))
    out.discard(None)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and (ROOT / "opie" / f"{parts[1]}.py").exists()):
        return ""
    return parts[1]


def test_the_graph_is_read():
    g = graph()
    assert "opie.head.daemon" in g and "opie.nbd.codec" in g and "opie.cli.main" in g
    assert "opie.nbd.codec" in g["opie.nbd.server"]  # a plain edge is seen


def test_a_function_level_import_counts(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from opie.head.daemon import Head\n"
                   "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .api import APIServer\n")
    known = {"opie.head.daemon", "opie.head.api", "opie.head.m"}
    assert imports_of("opie.head.m", mod, known) == {"opie.head.daemon", "opie.head.api"}


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles between opie modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_point_down_the_layers():
    wrong = []
    for mod, targets in graph().items():
        src = package_of(mod)
        for t in targets:
            dst = package_of(t)
            if dst == src:
                continue
            if src == "gui" and dst == "head" and t in GUI_MAY_USE:
                continue
            if LEVEL[dst] >= LEVEL[src]:
                wrong.append(f"{mod} imports {t} ({dst or 'opie'} is not below {src or 'opie'})")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_package_directory_is_listed_in_pyproject():
    """A subpackage missing from [tool.setuptools] packages would be left out of the wheel."""
    dirs = package_dirs()
    listed = {d.resolve() for d in dirs.values()}
    for d in list(dirs.values()):
        for init in d.rglob("__init__.py"):
            assert init.parent.resolve() in listed, f"{init.parent} is not listed in pyproject.toml"
