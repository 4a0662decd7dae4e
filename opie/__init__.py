"""Opie, a scale-out NAS head.

One distribution, one top-level name: the packages that sit at the top of the
source tree (nbd/, raid5/, discovery/, isu/, monitor/, recovery/, shares/,
head/, gui/, lab/, cli/) install as ``opie.nbd``, ``opie.raid5``, ... through
``[tool.setuptools.package-dir]`` in pyproject.toml, so nothing generic lands
in site-packages (a top-level ``nbd`` would shadow libnbd's Python binding).

In a source checkout this package also looks for its subpackages in the
checkout itself, so a Python started in a checkout (a test run, a second work
tree) imports that checkout's code whatever editable install it has.
"""
from __future__ import annotations

import os

__version__ = "0.1.0"

_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "pyproject.toml")) and os.path.isfile(
        os.path.join(_checkout, "nbd", "__init__.py")):
    __path__.append(_checkout)  # type: ignore[name-defined]  # noqa: F821
del _checkout
