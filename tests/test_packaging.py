"""The distribution provides one top-level name, `opie`.

Ten generic top-level packages (`nbd`, `head`, `cli`, ...) used to land in
site-packages, and `nbd` shadowed libnbd's Python binding. These tests read
the installed distribution's file list and a freshly built wheel, and import
from a Python that has only site-packages on its path (no checkout).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERIC = ["nbd", "raid5", "discovery", "isu", "monitor", "recovery", "shares", "head", "gui", "lab", "cli"]


def _top(entry: str) -> str:
    return entry.split("/", 1)[0]


def _isolated(code: str, *path: str) -> subprocess.CompletedProcess:
    """Run `code` in `python -I` (no cwd, no PYTHONPATH on sys.path) from /, with `path` prepended."""
    prelude = f"import sys; sys.path[:0] = {list(path)!r}\n"
    return subprocess.run([sys.executable, "-I", "-c", prelude + code], cwd="/", capture_output=True,
                          text=True, timeout=60)


def installed_files() -> list[str]:
    """The installed distribution's file list (RECORD), read by a Python that sees no checkout:
    a checkout's own opie.egg-info (written by the editable build) would answer instead."""
    res = _isolated("import importlib.metadata as m, json; d = m.distribution('opie');"
                    "print(json.dumps([str(d.locate_file(f)) + '\\0' + str(f) for f in d.files]))")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_installed_distribution_provides_only_opie():
    entries = [e.split("\0") for e in installed_files()]
    assert entries, "the opie distribution lists no files"
    files = [rel for _, rel in entries]
    assert any(f.endswith("RECORD") for f in files), files  # an installed dist-info, not an egg-info
    # ../../bin/opie is the console script; __pycache__ holds the editable finder's bytecode
    tops = {_top(f) for f in files if not f.startswith("..") and not f.startswith("__pycache__/__editable__")}
    allowed = {t for t in tops if t == "opie" or t.startswith("opie-")
               or (t.startswith("__editable__") and "opie" in t)}
    assert tops == allowed, f"top-level names besides opie: {sorted(tops - allowed)}"
    for where, rel in entries:
        if rel.endswith("_finder.py") and rel.startswith("__editable__"):
            text = Path(where).read_text()
            mapping_line = next(line for line in text.splitlines() if line.startswith("MAPPING"))
            mapping = eval(mapping_line.split("=", 1)[1])  # a dict literal written by setuptools
            assert all(k == "opie" or k.startswith("opie.") for k in mapping), mapping


@pytest.mark.parametrize("name", ["nbd", "head", "cli"])
def test_generic_names_are_not_importable_outside_a_checkout(name):
    res = _isolated(f"import {name}")
    assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, res.stdout + res.stderr
    res = _isolated(f"import opie.{name}; print(opie.{name}.__name__)")
    assert res.returncode == 0 and res.stdout.strip() == f"opie.{name}", res.stderr


def test_console_script_works():
    opie = shutil.which("opie")
    assert opie, "the opie console script is not on PATH"
    res = subprocess.run([opie, "--help"], cwd="/", capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("usage: opie"), res.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy, so the build leaves nothing (build/, egg-info) in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                             ".hypothesis", ".pytest_cache", "lab-*"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (whl,) = out.glob("opie-*.whl")
    return whl


def test_wheel_holds_one_top_level_package(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path)
    tops = {_top(n) for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"opie"}, sorted(tops)
    for pkg in GENERIC:
        assert f"opie/{pkg}/__init__.py" in names, f"opie.{pkg} is missing from the wheel"
    assert "opie/head/volumes/__init__.py" in names
    res = _isolated("import opie.cli.main, opie.head.volumes.pool, opie.raid5.engine; print(opie.cli.main.__file__)",
                    str(tmp_path))
    assert res.returncode == 0 and res.stdout.startswith(str(tmp_path)), res.stderr
    for pkg in GENERIC:
        assert _isolated(f"import {pkg}", str(tmp_path)).returncode != 0
