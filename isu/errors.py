"""Errors of the isu package that callers outside it (the head, the CLI) catch by type."""
from __future__ import annotations


class ControlError(Exception):
    """The ISU's control channel did not answer, answered garbage, or refused
    (`ok: false`, e.g. a join from a client that is not a head); raised by
    isu.control.call on the head's side."""


class FencingError(Exception):
    """A fence could not be completed (its sessions did not end in time, or
    the epoch could not be made durable): it is not acknowledged."""


class StaleEpoch(FencingError):
    """A fence asked for an epoch below the one this ISU accepted: a stale
    head. Nothing changed."""


class EpochRecordError(FencingError):
    """The ISU's epoch record is torn or corrupt. The ISU refuses to serve
    rather than forget the epoch (that would let a fenced head write again)."""
