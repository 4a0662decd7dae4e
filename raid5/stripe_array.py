"""What the stripe executor (`stripe.py`) needs of the array it works for.

`engine.Array` implements this protocol; the executor is given an array as a
`StripeArray` and never imports the engine, so the dependency points one way:
engine -> stripe -> stripe_array. Every method is for the task that holds the
stripe's lock (see `locks.py`).
"""

from __future__ import annotations

from typing import Protocol

from .checksums import ChecksumTable
from .geometry import Geometry
from .ppl import PPLRecord
from .stats import ArrayStats


class StripeArray(Protocol):
    geom: Geometry
    uuid: bytes
    journal: bool                # False: test-only, no partial-parity log
    stats: ArrayStats

    @property
    def csums(self) -> list[ChecksumTable]:
        """The checksum table of each role (None for a role without a member)."""
        ...

    def member_name(self, role: int) -> str: ...

    def missing(self, stripe: int) -> list[int]:
        """Roles that do not hold current chunks of `stripe`."""
        ...

    def missing_one(self, stripe: int) -> int | None:
        """The one role `stripe` must do without, or None; ArrayFailed if more."""
        ...

    async def mread(self, role: int, offset: int, length: int) -> bytes:
        """Read from `role`'s member; a failure marks it faulty and raises MemberLost."""
        ...

    async def mwrite(self, role: int, offset: int, data: bytes, fua: bool) -> None:
        """Write to `role`'s member; a failure marks it faulty and raises MemberLost."""
        ...

    async def write_member(self, role: int, offset: int, data: bytes, fua: bool) -> None:
        """Write to `role`'s member, raising its OSError as is; for writes
        gathered in parallel, whose results the caller hands to `settle`."""
        ...

    async def settle(self, roles: list[int], results: list) -> list[int]:
        """After a gather(return_exceptions=True) over `roles`: mark the members
        that failed faulty and return their roles; re-raise anything else."""
        ...

    def note_written(self, stripe: int, role: int) -> None:
        """A write to `role`'s chunk of `stripe` completed (durable after its next flush)."""
        ...

    async def make_durable(self, stripe: int, roles: set[int]) -> None:
        """Flush those of `roles` whose chunk of `stripe` has unflushed writes."""
        ...

    def has_live_record(self, stripe: int) -> bool:
        """Could a crash now replay a log record of `stripe`?"""
        ...

    def ppl_generation(self, role: int) -> int:
        """The log generation of `role`'s current member (records of older ones are ignored)."""
        ...

    def next_seq(self) -> int:
        """A new log record seq; it stays live until `seq_done`."""
        ...

    async def ppl_append(self, role: int, record: PPLRecord, payload: bytes) -> int:
        """Append `record` durably to `role`'s log ring; returns its ticket."""
        ...

    async def ppl_mark_durable(self, role: int, seq: int) -> None:
        """A FUA update is durable: its log record must not be replayed any more."""
        ...

    async def seq_done(self, role: int, seq: int) -> None:
        """The update logged as `seq` on `role`'s ring is written (not yet flushed)."""
        ...
