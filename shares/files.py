"""Reading config files that may not exist yet (writes go through opie.fileio.atomic_write)."""
from __future__ import annotations

from pathlib import Path


def read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
