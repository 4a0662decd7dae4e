"""Names of the head's NBD exports: a volume is exported under its own name,
a snapshot as VOLUME@SNAPSHOT (the same name its mount and share use)."""
from __future__ import annotations

SNAPSHOT_SEP = "@"


def snapshot_export(volume: str, snapshot: str) -> str:
    return f"{volume}{SNAPSHOT_SEP}{snapshot}"
