"""The ISU package's import structure: the agent (NBD serving) and its
cluster services (address, presence, console, control channel) do not
import each other; one module composes them (issue 9, 1: no import circles).

Imports are read with ast anywhere in a module (module level, inside
functions, under TYPE_CHECKING): an import moved into a function to dodge a
circle is still a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ISU = Path(__file__).resolve().parent.parent / "isu"


def opie_imports(module: str) -> set[str]:
    """The opie.isu.* modules that isu/`module`.py imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse((ISU / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("opie.isu.")}


def test_agent_and_services_do_not_import_each_other() -> None:
    agent, services = opie_imports("agent"), opie_imports("services")
    both = "opie.isu.services" in agent and "opie.isu.agent" in services
    assert not both, f"import circle: agent imports {sorted(agent)}, services imports {sorted(services)}"
