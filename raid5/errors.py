"""Errors raised by the RAID5 engine.

Two kinds, as everywhere in Opie: `IntegrityError` for bytes that fail their
own checks (a record whose magic or checksum is wrong), and `OSError`
subclasses carrying an errno for array state the caller cannot fix by retrying.
"""

from __future__ import annotations

import errno


class IntegrityError(Exception):
    """An on-disk record failed a check; the message says "expected X, got Y"."""


class AssemblyError(OSError):
    """The members given cannot form the array (foreign, stale, too few)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class ArrayFailed(OSError):
    """Two members are lost: the array refuses I/O rather than return or write garbage."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class UnrecoverableBlock(OSError):
    """A block failed its checksum and parity cannot rebuild it."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


def expect(what: str, expected: object, got: object) -> None:
    """Raise IntegrityError unless `got == expected`."""
    if got != expected:
        raise IntegrityError(f"{what}: expected {expected!r}, got {got!r}")


class MemberLost(Exception):
    """Internal: an I/O of member `role` failed and the member is now faulty;
    the stripe operation in progress re-plans without it."""

    def __init__(self, role: int) -> None:
        super().__init__(f"member role {role} lost")
        self.role = role
