"""The stack, the scheduler and the reference model of the concurrent property test.

Stack (tests/test_concurrent_properties.py drives it), bottom up:

    MemoryMember(volatile)   a disk with a write-back cache (raid5.member)
    FaultyMember             member loss and power cuts (raid5.testing)
    JitterMember             the scheduler: each I/O waits a seeded number of
                             event-loop turns first, so operations interleave
                             differently per seed but identically per seed
    Array                    raid5 over the members
    Window                   a slice of the array, placed so that the pool's
                             data segments straddle a checksum-block boundary
                             of every member (block 1020 of its chunk area)
    Pool                     opie.head.volumes: volumes and snapshots

Model: every write fills its 512-byte blocks with `pattern` (magic, volume
incarnation, write id, block index), so a block read back names where it
came from. A `View` keeps, per block, the write ids a read may return now
(`vis`) and those a power cut may leave (`dur`); 0 is the zero block.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from opie.head.volumes import Pool
from opie.head.volumes.devices import check_range
from opie.head.volumes.layout import Geometry as PoolGeometry
from opie.raid5.assemble import assemble, create
from opie.raid5.engine import Array
from opie.raid5.errors import AssemblyError
from opie.raid5.geometry import CSUMS_PER_BLOCK, Geometry
from opie.raid5.member import MemoryMember
from opie.raid5.scrub import ScrubReport, scrub_stripe
from opie.raid5.superblock import MemberState
from opie.raid5.testing import Cut, FaultyMember

BLOCK = 512                       # pattern block: a sector, the pool's bitmap block
ZERO = 0                          # the write id of a block never written
_HEAD = struct.Struct("<4sIII")   # magic, volume incarnation, write id, block index
MAGIC = b"OPCP"


class Garbage(AssertionError):
    """A block read back that is neither zeros nor one whole pattern block."""


def pattern(vol: int, wid: int, first: int, count: int) -> bytes:
    """Blocks first..first+count-1 of write `wid` to volume incarnation `vol`."""
    reps = BLOCK // _HEAD.size
    return b"".join(_HEAD.pack(MAGIC, vol, wid, b) * reps for b in range(first, first + count))


def decode(block: bytes) -> tuple[int, int, int]:
    """(volume, write id, block index) of one block; (0, ZERO, 0) for zeros."""
    if not any(block):
        return 0, ZERO, 0
    head = bytes(block[:_HEAD.size])
    if head * (BLOCK // _HEAD.size) != block:
        raise Garbage(f"block is not one pattern: starts {bytes(block[:32]).hex()}")
    magic, vol, wid, index = _HEAD.unpack(head)
    if magic != MAGIC:
        raise Garbage(f"block has magic {magic!r}, not {MAGIC!r}")
    return vol, wid, index


# -- the scheduler ----------------------------------------------------------

QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("quiet", default=False)


class JitterMember:
    """A member whose every I/O first waits 0, a few or many loop turns, as
    drawn from its seeded generator (tasks started under `QUIET` never wait:
    setup and the model's own checks do not reorder the operations)."""

    def __init__(self, inner: FaultyMember, rng: random.Random) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.rng = rng

    async def _wait(self) -> None:
        if QUIET.get():
            return
        r = self.rng.random()
        turns = 0 if r < 0.5 else self.rng.randint(1, 3) if r < 0.85 else self.rng.randint(8, 64)
        for _ in range(turns):
            await asyncio.sleep(0)

    async def read(self, offset: int, length: int) -> bytes:
        await self._wait()
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._wait()
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        await self._wait()
        await self.inner.flush()


async def turns_until_done(tasks: Iterable[asyncio.Future], turns: int, what: str) -> None:
    """Run the loop until every task is done; AssertionError after `turns` turns."""
    pending = [t for t in tasks if not t.done()]
    for _ in range(turns):
        pending = [t for t in pending if not t.done()]
        if not pending:
            return
        await asyncio.sleep(0)
    if any(not t.done() for t in pending):
        raise AssertionError(f"{what}: still running after {turns} loop turns (a hang)")


# -- the stack ----------------------------------------------------------------

class Window:
    """Bytes [base, base + size) of a block device, as a block device."""

    def __init__(self, device: Array, base: int, size: int) -> None:
        self.device, self.base, self.size = device, base, size

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self.size, offset, length)
        return await self.device.read(self.base + offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        check_range(self.size, offset, len(data))
        await self.device.write(self.base + offset, data, fua)

    async def flush(self) -> None:
        await self.device.flush()


@dataclass
class Layout:
    """Sizes of one test stack (small, so an example takes milliseconds)."""

    members: int = 3
    chunk: int = 4096
    ppl: int = 64 << 10           # small: rings fill and force flushes (make_room)
    region_stripes: int = 2
    segment: int = 16384          # two whole stripes: full-stripe runs happen
    segments: int = 32
    below_boundary: int = 6       # data segments below the checksum-block boundary (the
                                  # last of them straddles it)
    max_entries: int = 31
    journal_blocks: int = 8       # the pool checkpoints every few commits

    def place(self) -> tuple[int, int, int]:
        """(array stripes, window base, window size)."""
        guess = PoolGeometry.plan((self.segments + 16) * self.segment, self.segment,
                                  self.max_entries, self.journal_blocks)
        size = guess.data_start + self.segments * self.segment
        pool = PoolGeometry.plan(size, self.segment, self.max_entries, self.journal_blocks)
        assert (pool.data_start, pool.segment_count) == (guess.data_start, self.segments)
        stripe = (self.members - 1) * self.chunk
        # member block CSUMS_PER_BLOCK starts the second checksum block; one
        # segment holds the stripes on both sides of it, so a full-segment
        # write updates both checksum blocks in one go
        boundary = CSUMS_PER_BLOCK * 4096 // self.chunk * stripe
        base = boundary - pool.data_start - self.below_boundary * self.segment + stripe
        assert base >= 0 and base % stripe == 0, base
        return -(-(base + size) // stripe) + 1, base, size


@dataclass
class Stack:
    layout: Layout
    rng: random.Random
    cut: Cut = field(default_factory=Cut)
    mems: list[MemoryMember] = field(default_factory=list)
    disks: list[FaultyMember] = field(default_factory=list)
    members: list[JitterMember] = field(default_factory=list)
    arr: Array | None = None
    pool: Pool | None = None
    base: int = 0
    size: int = 0

    async def build(self) -> None:
        """Create the array and format the pool (quietly: no jitter)."""
        lay = self.layout
        stripes, self.base, self.size = lay.place()
        geom = Geometry(lay.members, lay.chunk, stripes, lay.ppl)
        for i in range(lay.members):
            mem = MemoryMember(geom.data_offset + stripes * lay.chunk, f"disk{i}", volatile=True)
            disk = FaultyMember(mem, self.cut)
            self.mems.append(mem)
            self.disks.append(disk)
            self.members.append(JitterMember(disk, random.Random(self.rng.random())))
        token = QUIET.set(True)
        try:
            self.arr = await create(self.members, chunk_size=lay.chunk, ppl_size=lay.ppl,
                                    region_stripes=lay.region_stripes, assume_clean=True)
            self.pool = await Pool.format(self.window(), segment_size=lay.segment,
                                          max_entries=lay.max_entries,
                                          journal_blocks=lay.journal_blocks)
        finally:
            QUIET.reset(token)

    def release(self) -> None:
        """Free the member images now (tasks and frames may keep the stack alive
        in reference cycles; the images are most of an example's memory)."""
        for mem in self.mems:
            mem.data = bytearray()
            mem._stable = bytearray()
            mem._unflushed.clear()

    def window(self) -> Window:
        assert self.arr is not None
        return Window(self.arr, self.base, self.size)

    def healthy(self) -> bool:
        arr = self.arr
        return arr is not None and not arr.tasks and not arr.failed and all(
            s.state is MemberState.IN_SYNC for s in arr.slots) and not any(
            d.failed for d in self.disks)

    async def power_cut(self, tasks: list[asyncio.Task], keep: float) -> None:
        """The head loses power: every member I/O fails from now, every task
        (operations and the array's background work) ends, and each member
        keeps what it had made stable plus a seeded subset of its cache."""
        assert self.arr is not None
        self.cut.fired = True
        # the process dies: every task on the loop, not only those we know of
        everything = [*tasks, *self.arr.tasks, *(asyncio.all_tasks() - {asyncio.current_task()})]
        for t in everything:
            t.cancel()
        await turns_until_done(everything, 10_000, "tasks after a power cut")
        for mem in self.mems:
            mem.power_loss(self.rng, keep)
        self.cut.budget, self.cut.fired, self.cut.when = None, False, None
        self.arr = self.pool = None

    async def restart(self) -> None:
        """Assemble the array from the members (a lost one stays missing, a
        stale one is left out to be re-added) and open the pool, quietly."""
        token = QUIET.set(True)
        members = list(self.members)
        try:
            while True:
                try:
                    self.arr = await assemble(members)
                    break
                except AssemblyError as exc:
                    # as the message asks: leave a stale member out, re-add it later
                    stale = [m for m in members if str(exc).startswith(f"[Errno 22] {m.name}: stale")]
                    if not stale:
                        raise
                    members.remove(stale[0])
            self.pool = await Pool.open(self.window())
        finally:
            QUIET.reset(token)

    def window_stripes(self) -> range:
        assert self.arr is not None
        stripe = self.arr.geom.stripe_data_size
        return range(self.base // stripe, -(-(self.base + self.size) // stripe))

    async def scrub(self) -> ScrubReport:
        """Scrub the stripes under the pool (the rest of the array is never
        written), each under its stripe lock. Only while `healthy()`: no
        member can fail under it."""
        arr = self.arr
        assert arr is not None and self.healthy()
        report = ScrubReport()
        for s in self.window_stripes():
            async with arr.locks.hold(s):
                await scrub_stripe(arr, s, report)
        return report


# -- the reference model ---------------------------------------------------------

@dataclass
class ReadWatch:
    """What a read of blocks [lo, hi) of `view` may return: what was visible
    when it started, plus whatever was written (or zeroed) during it."""

    view: "View"
    lo: int
    hi: int
    vis: list[set[int]]
    ver: list[int]
    idle: list[bool]
    since: int
    resizes: int
    gone: bool
    resizing: bool               # a resize was in flight when the read started

    def allowed(self, b: int) -> set[int]:
        out = set(self.vis[b - self.lo])
        for wid, lo, hi in self.view.log[self.since:]:
            if lo <= b < hi:
                out.add(wid)
        return out

    def may_fail(self, exc: OSError) -> bool:
        """ENODEV while the view was being deleted; EINVAL across a resize (one
        in flight when the read started, or started since: the volume checks
        the range again once it holds the segment locks, after the shrink)."""
        if exc.errno == errno.ENODEV:
            return self.gone or self.view.state != "live"
        if exc.errno == errno.EINVAL:
            return self.resizing or self.resizes != self.view.resizes or self.view.resizing
        return False

    def check(self, data: bytes) -> None:
        """Every block is the view's own, at its own place, and allowed; blocks
        nothing wrote during the read become what the read saw."""
        view = self.view
        for b in range(self.lo, self.hi):
            raw = data[(b - self.lo) * BLOCK:(b - self.lo + 1) * BLOCK]
            try:
                vol, wid, index = decode(raw)
            except Garbage as exc:
                raise AssertionError(f"{view.name} block {b}: {exc}") from None
            if wid != ZERO:
                assert vol == view.vol, (f"{view.name} block {b}: bytes of volume "
                                         f"incarnation {vol} (write {wid}), not {view.vol}")
                assert index == b, f"{view.name} block {b}: holds block {index} of write {wid}"
            allowed = self.allowed(b)
            assert wid in allowed, (f"{view.name} block {b}: read write {wid}, "
                                    f"expected one of {sorted(allowed)}")
            if (b < len(view.vis) and self.idle[b - self.lo] and self.resizes == view.resizes
                    and view.ver[b] == self.ver[b - self.lo]):
                view.vis[b] = {wid}


class View:
    """A volume or snapshot as the model sees it."""

    def __init__(self, name: str, vol: int, blocks: list[set[int]], handle, snapshot: bool):
        self.name = name
        self.vol = vol                   # volume incarnation the patterns name
        self.vis = [set(s) for s in blocks]
        self.dur = [set(s) for s in blocks]
        self.ver = [0] * len(blocks)     # bumped by every write event on a block
        self.busy = [0] * len(blocks)    # writes in flight on a block
        self.log: list[tuple[int, int, int]] = []    # (write id, lo, hi) started, in order
        self.active: dict[int, tuple[int, int]] = {}
        self.started: dict[int, int] = {}   # write id in flight -> its place in `log`
        self.handle = handle
        self.snapshot = snapshot
        self.state = "live"              # live, deleting, deleted
        self.resizes = 0
        self.resizing = False
        self.sizes = {len(blocks)}       # sizes (in blocks) a power cut may leave

    @property
    def blocks(self) -> int:
        return len(self.vis)

    def overlaps_write(self, lo: int, hi: int) -> bool:
        return any(a < hi and lo < b for a, b in self.active.values())

    def _bump(self, lo: int, hi: int) -> range:
        span = range(lo, min(hi, len(self.vis)))
        for b in span:
            self.ver[b] += 1
        return span

    def write_started(self, wid: int, lo: int, hi: int) -> None:
        self.started[wid] = len(self.log)
        self.log.append((wid, lo, hi))
        self.active[wid] = (lo, hi)
        for b in self._bump(lo, hi):
            self.busy[b] += 1
            self.dur[b].add(wid)

    def write_ended(self, wid: int, outcome: str) -> None:
        """outcome: 'acked', 'fua' (durable), 'nospace' (nothing written), 'failed'."""
        lo, hi = self.active.pop(wid)
        # what started after this write on its blocks (only a shrink's zeroing:
        # writes in flight never overlap) may still land over it
        later = self.log[self.started.pop(wid) + 1:]
        for b in self._bump(lo, hi):
            self.busy[b] -= 1
            after = {w for w, a, z in later if a <= b < z}
            if outcome in ("acked", "fua"):
                self.vis[b] = {wid} | after
            elif outcome == "failed":
                self.vis[b].add(wid)
            if outcome == "fua":
                self.dur[b] = {wid} | after

    def watch(self, lo: int, hi: int) -> ReadWatch:
        vis = []
        for b in range(lo, hi):
            s = set(self.vis[b]) if b < len(self.vis) else {ZERO}
            s |= {w for w, (a, z) in self.active.items() if a <= b < z}
            vis.append(s)
        return ReadWatch(self, lo, hi, vis,
                         [self.ver[b] if b < len(self.ver) else -1 for b in range(lo, hi)],
                         [b < len(self.busy) and self.busy[b] == 0 for b in range(lo, hi)],
                         len(self.log), self.resizes, self.state != "live", self.resizing)

    def freeze(self) -> "Freeze":
        """What a flush or snapshot starting now covers."""
        return Freeze(self, [set(s) for s in self.vis], dict(self.active), len(self.log))

    def flushed(self, f: "Freeze") -> None:
        """A flush that started at `f` returned: what it covered is durable."""
        for b in range(len(self.dur)):
            self.dur[b] &= f.candidates(b)
            assert self.dur[b], f"{self.name} block {b}: model lost every candidate"

    def shrinking(self, blocks: int) -> None:
        """A shrink to `blocks` started: the dropped tail may read (and stay) zero."""
        self.resizes += 1
        self.resizing = True
        self.sizes.add(blocks)
        self.log.append((ZERO, blocks, len(self.vis)))
        for b in self._bump(blocks, len(self.vis)):
            self.vis[b].add(ZERO)
            self.dur[b].add(ZERO)

    def resized(self, blocks: int) -> None:
        self.resizing = False
        del self.vis[blocks:], self.dur[blocks:], self.ver[blocks:], self.busy[blocks:]
        grow = blocks - len(self.vis)
        self.vis += [{ZERO} for _ in range(grow)]
        self.dur += [{ZERO} for _ in range(grow)]
        self.ver += [0] * grow
        self.busy += [0] * grow
        self.sizes = {blocks}

    def restarted(self, blocks: list[int], handle) -> None:
        """After a power cut: the view now holds exactly `blocks`."""
        self.vis = [{w} for w in blocks]
        self.dur = [{w} for w in blocks]
        self.ver = [0] * len(blocks)
        self.busy = [0] * len(blocks)
        self.log, self.active, self.started = [], {}, {}
        self.handle = handle
        self.state = "live"
        self.resizing = False
        self.sizes = {len(blocks)}


@dataclass
class Freeze:
    view: View
    vis: list[set[int]]
    active: dict[int, tuple[int, int]]
    since: int

    def candidates(self, b: int) -> set[int]:
        out = set(self.vis[b]) if b < len(self.vis) else {ZERO}
        out |= {w for w, (lo, hi) in self.active.items() if lo <= b < hi}
        out |= {w for w, lo, hi in self.view.log[self.since:] if lo <= b < hi}
        return out


def decode_all(view: View, data: bytes) -> list[int]:
    """Write ids of each block of a whole-view read, checked to be the view's own."""
    out = []
    for b in range(len(data) // BLOCK):
        try:
            vol, wid, index = decode(data[b * BLOCK:(b + 1) * BLOCK])
        except Garbage as exc:
            raise AssertionError(f"{view.name} block {b}: {exc}") from None
        if wid != ZERO:
            assert (vol, index) == (view.vol, b), (
                f"{view.name} block {b}: holds block {index} of volume incarnation {vol}")
        out.append(wid)
    return out


@contextlib.contextmanager
def quiet():
    token = QUIET.set(True)
    try:
        yield
    finally:
        QUIET.reset(token)
