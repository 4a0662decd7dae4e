"""Errors of the volume layer.

Two kinds, as everywhere in Opie: `ValidationError` for bad admin input
(nothing was changed), and system-state errors — `IntegrityError` for on-disk
metadata that fails a check, `NotFoundError` for a name that does not exist.
Device and space failures surface as `OSError` carrying the errno
(ENOSPC when the pool is full, EROFS for a write to a snapshot, EINVAL for
I/O beyond the end of a volume).
"""

from __future__ import annotations


class IntegrityError(Exception):
    """On-disk metadata is not what it must be ("expected X, got Y")."""


class UnsupportedVersion(IntegrityError):
    """A pool of another on-disk format version; nothing was changed."""

    def __init__(self, expected: int, version: int) -> None:
        hint = (" (version 1 predates sub-segment copy-on-write; open it with the release "
                "that made it and copy its volumes to a new pool)") if version == 1 else ""
        super().__init__(f"pool format version: expected {expected}, got {version}{hint}")
        self.version = version


class ValidationError(ValueError):
    """Bad admin input; `field` names what was wrong. Nothing was changed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFoundError(LookupError):
    """No volume or snapshot of that name."""
