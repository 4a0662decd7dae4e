"""Errors of the active/passive machinery (head.ha).

`MirrorError`: the mapping-table mirror could not do what was asked (the
passive refused a record, the channel failed, a record does not follow the
copy); nothing was changed on the side that raised it. `FrameError`: a
mirror frame, on the wire or in the passive's on-disk copy, fails a check
("expected X, got Y").
"""
from __future__ import annotations


class MirrorError(Exception):
    """The mapping-table mirror could not do what was asked; nothing was changed."""


class FrameError(MirrorError):
    """A mirror frame fails a check: bad magic, version, kind, length or crc32."""


class TakeoverError(Exception):
    """A takeover step could not be done (e.g. fewer than N-1 member ISUs
    acknowledged the fence): the head writes nothing and goes back to passive."""
