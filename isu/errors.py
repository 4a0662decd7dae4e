"""Errors of the isu package that callers outside it (the head, the CLI) catch by type."""
from __future__ import annotations


class ControlError(Exception):
    """The ISU's control channel did not answer, answered garbage, or refused
    (`ok: false`, e.g. a join from a client that is not a head); raised by
    isu.control.call on the head's side."""
