"""Fault injection for tests and benchmarks: counting, failing, power cuts.

`PowerCut` models the head losing power: once a shared `Cut` has let its
budget of writes through, the next write is torn (a block-aligned prefix
lands, or nothing) and every later I/O on every member raises `PowerCut`.
The test then throws the Array object away, calls `power_loss()` on volatile
`MemoryMember`s and assembles again from the same members.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field

from .geometry import BLOCK
from .member import Member, MemoryMember


class PowerCut(Exception):
    """The head lost power: not a member failure, the whole process stops."""


@dataclass
class Cut:
    budget: int | None = None          # writes still allowed; None = no cut armed
    tear: bool = True
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    fired: bool = False

    def arm(self, writes: int) -> None:
        self.budget, self.fired = writes, False


@dataclass
class IOCount:
    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    written_bytes: int = 0


class FaultyMember:
    """Wraps a member; counts I/O, can fail (EIO) and takes part in power cuts."""

    def __init__(self, inner: Member, cut: Cut | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.cut = cut
        self.count = IOCount()
        self.failed = False

    def _gate(self) -> None:
        if self.cut is not None and self.cut.fired:
            raise PowerCut(f"{self.name}: power is off")
        if self.failed:
            raise OSError(errno.EIO, f"{self.name}: I/O error")

    async def read(self, offset: int, length: int) -> bytes:
        self._gate()
        self.count.reads += 1
        self.count.read_bytes += length
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._gate()
        cut = self.cut
        if cut is not None and cut.budget is not None:
            if cut.budget == 0:
                cut.fired = True
                if cut.tear and len(data) > BLOCK:
                    keep = cut.rng.randrange(0, len(data) // BLOCK) * BLOCK
                    if keep:
                        await self.inner.write(offset, data[:keep], fua)
                raise PowerCut(f"{self.name}: power cut during write at {offset}")
            cut.budget -= 1
        self.count.writes += 1
        self.count.written_bytes += len(data)
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        self._gate()
        await self.inner.flush()

    def reset_count(self) -> None:
        self.count = IOCount()


def corrupt(member: MemoryMember, offset: int, length: int, rng: random.Random) -> None:
    """Flip random bits in member bytes [offset, offset+length), cache and stable copy alike."""
    for _ in range(max(1, length // 512)):
        at = offset + rng.randrange(length)
        bit = 1 << rng.randrange(8)
        member.data[at] ^= bit
        if member._stable is not None:
            member._stable[at] ^= bit
