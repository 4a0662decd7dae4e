"""Fault injection for tests and benchmarks: counting, failing, power cuts,
and flushes the test paces (`PacedMember`) to force one interleaving.

`PowerCut` models the head losing power: once a shared `Cut` has let its
budget of writes through, the next write is torn (a block-aligned prefix
lands, or nothing) and every later I/O on every member raises `PowerCut`.
The test then throws the Array object away, calls `power_loss()` on volatile
`MemoryMember`s and assembles again from the same members.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .geometry import BLOCK
from .member import Member, MemoryMember


class PowerCut(Exception):
    """The head lost power: not a member failure, the whole process stops."""


@dataclass
class Cut:
    budget: int | None = None          # writes still allowed; None = no cut armed
    tear: bool = True
    when: Callable[[str, int, int], bool] | None = None  # or: cut at the first matching write
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
        if cut is not None and cut.when is not None and cut.when(self.name, offset, len(data)):
            cut.budget = 0
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


class Held:
    """One write or flush held by a `PacedMember`. The test sets `effect` to
    let it reach the disk (for a flush: what was written before then becomes
    stable), then `reply` to let the caller see it complete."""

    def __init__(self) -> None:
        self.effect = asyncio.Event()
        self.reply = asyncio.Event()

    def release(self) -> None:
        self.effect.set()
        self.reply.set()


class PacedMember:
    """Wraps a member so a test can force one interleaving, as a network might
    order things: while `hold` is true every flush() is put on `flushes`, and
    every write for which `hold_write(offset, length)` is true on `writes`, as
    a `Held` that waits for the test (see there). A held call that is
    cancelled before its `effect` never reaches the disk."""

    def __init__(self, inner: Member) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.hold = False
        self.hold_write: Callable[[int, int], bool] | None = None
        self.flushes: asyncio.Queue[Held] = asyncio.Queue()
        self.writes: asyncio.Queue[Held] = asyncio.Queue()

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if self.hold_write is None or not self.hold_write(offset, len(data)):
            await self.inner.write(offset, data, fua)
        else:
            await self._held(self.writes, lambda: self.inner.write(offset, data, fua))

    async def flush(self) -> None:
        if self.hold:
            await self._held(self.flushes, self.inner.flush)
        else:
            await self.inner.flush()

    @staticmethod
    async def _held(queue: "asyncio.Queue[Held]", io: Callable[[], Awaitable[None]]) -> None:
        call = Held()
        queue.put_nowait(call)
        await call.effect.wait()
        await io()
        await call.reply.wait()

    async def next_flush(self, timeout: float = 5.0) -> Held:
        """The next flush the array sent to this member (bounded wait)."""
        return await asyncio.wait_for(self.flushes.get(), timeout)

    async def next_write(self, timeout: float = 5.0) -> Held:
        """The next held write the array sent to this member (bounded wait)."""
        return await asyncio.wait_for(self.writes.get(), timeout)


def corrupt(member: MemoryMember, offset: int, length: int, rng: random.Random) -> None:
    """Flip random bits in member bytes [offset, offset+length), cache and stable copy alike."""
    for _ in range(max(1, length // 512)):
        at = offset + rng.randrange(length)
        bit = 1 << rng.randrange(8)
        member.data[at] ^= bit
        if member._stable is not None:
            member._stable[at] ^= bit


@dataclass
class Rig:
    """A test array over FaultyMember(MemoryMember) members sharing one Cut."""

    disks: list[FaultyMember]
    cut: Cut
    chunk_size: int
    ppl_size: int
    arr: Any = None

    async def create(self, **options: Any) -> Any:
        """A fresh array over the disks (bitmap region = 1 stripe unless told)."""
        from .assemble import create
        options.setdefault("region_stripes", 1)
        options.setdefault("assume_clean", True)
        self.arr = await create(self.disks, chunk_size=self.chunk_size, ppl_size=self.ppl_size,
                                **options)
        return self.arr

    async def fill(self) -> bytearray:
        """Write random bytes over the whole array and flush; returns them."""
        ref = bytearray(os.urandom(self.arr.size))
        await self.arr.write(0, bytes(ref))
        await self.arr.flush()
        return ref

    @property
    def mems(self) -> list[MemoryMember]:
        return [d.inner for d in self.disks]  # type: ignore[misc]

    def power_loss(self, rng: random.Random | None = None, keep: float = 0.5) -> None:
        """The head lost power: drop every member's cache and disarm the cut."""
        for m in self.mems:
            m.power_loss(rng, keep)
        self.cut.budget, self.cut.fired, self.cut.when = None, False, None


def rig(members: int = 4, *, stripes: int = 16, chunk_size: int = 16384,
        ppl_size: int = 256 << 10, volatile: bool = False) -> Rig:
    """Members just big enough for `stripes` stripes of `chunk_size`."""
    from .geometry import Geometry
    g = Geometry(members, chunk_size, stripes, ppl_size)
    size = g.data_offset + stripes * chunk_size
    cut = Cut()
    disks = [FaultyMember(MemoryMember(size, f"disk{i}", volatile=volatile), cut)
             for i in range(members)]
    return Rig(disks, cut, chunk_size, ppl_size)
