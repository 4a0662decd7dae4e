"""The array: a block device (size, read, write with FUA, flush) over members.

Durability contract: a write acknowledged with `fua=True`, or followed by an
acknowledged `flush()`, survives any crash and the loss of any one member.
Ordering per stripe update: write-intent bit durable on every live member,
then the partial-parity log record (FUA) on the parity member, then data and
parity together, then checksums. A second member failure sets `failed` and
every later write raises `ArrayFailed` (EIO); nothing is written half-known.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import Counter
from typing import AsyncIterator

from . import stripe as stripe_ops
from .bitmap import BitmapRecord
from .checksums import ChecksumTable
from .errors import ArrayFailed, MemberLost
from .geometry import BITMAP_OFFSET, SUPERBLOCK_OFFSET, Geometry
from .locks import StripeLocks
from .member import Member
from .phases import Phase, PhaseKind
from .ppl import PPLRecord
from .ring import PPLRing
from .shield import run_to_end
from .stats import ArrayStats
from .superblock import MemberState, Superblock

log = logging.getLogger(__name__)

MAX_STRIPES_IN_FLIGHT = 16
RUN_STRIPES = 32     # whole stripes moved as one I/O per member


class Slot:
    """One role of the array and the member currently holding it (if any)."""

    def __init__(self, role: int, member: Member | None, state: MemberState, member_uuid: bytes,
                 ppl_generation: int = 0, checkpoint: int = 0) -> None:
        self.role = role
        self.member = member
        self.state = state
        self.member_uuid = member_uuid
        self.ppl_generation = ppl_generation
        self.checkpoint = checkpoint           # persisted recovery stripe (REBUILDING)
        self.recovery_stripe = checkpoint      # in memory, ahead of the checkpoint
        self.stale_regions: set[int] = set()   # RESYNCING: regions still to copy
        self.resync_region = -1                # RESYNCING: region being copied now ...
        self.resync_cursor = 0                 # ... valid below this stripe
        self.ring: PPLRing | None = None
        self.csums: ChecksumTable | None = None

    @property
    def name(self) -> str:
        return self.member.name if self.member is not None else f"role{self.role}"

    async def read(self, offset: int, length: int) -> bytes:
        if self.member is None:
            raise OSError(errno.ENXIO, f"role {self.role} has no member")
        return await self.member.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if self.member is None:
            raise OSError(errno.ENXIO, f"role {self.role} has no member")
        await self.member.write(offset, data, fua)


class Array:
    """Use `raid5.assemble.create` or `raid5.assemble.assemble` to get one.
    It is the `StripeArray` the stripe executor works for."""

    def __init__(self, geom: Geometry, uuid: bytes, slots: list[Slot], *, region_stripes: int,
                 events: int, dirty_regions: set[int], journal: bool = True,
                 name: str = "md0", scrub_stripe: int = 0) -> None:
        self.geom = geom
        self.uuid = uuid
        self.name = name
        self.slots = slots
        self.journal = journal
        self.events = events
        self.region_stripes = region_stripes
        self.nregions = -(-geom.stripes // region_stripes)
        self.scrub_stripe = scrub_stripe
        self.clean = False
        self.failed: ArrayFailed | None = None
        self.logged: dict[int, int] = {}      # stripe -> seq of its newest log record
        self.locks = StripeLocks()
        self.stats = ArrayStats()
        self.phases: dict[PhaseKind, Phase] = {}
        self.last_scrub = None
        self.tasks: set[asyncio.Task] = set()
        self._seq = 0
        self._live_seqs: set[int] = set()     # log records whose update is not yet written
        self._retired = 0                     # seq retired by the last flush (maybe not durable)
        self.retired_durable = 0              # seq retired in a bitmap written with FUA
        self._room_lock = asyncio.Lock()
        self._dirty = set(dirty_regions)
        self._durable = set(dirty_regions)
        self._inflight: Counter = Counter()
        self._flush_gen = 0                   # flushes begun so far: the generation of the next is +1
        self._written_gen: dict[int, int] = {}   # region -> _flush_gen when its last write ended
        self._flush_epoch = [0] * geom.members         # flushes started, per role
        self._durable_epoch = [0] * geom.members       # writes completed before this epoch are durable
        self._unflushed_chunks: dict[tuple[int, int], int] = {}   # (stripe, role) -> epoch written
        self.pending_resync: set[int] = set()
        self._bm_lock = asyncio.Lock()
        self._sb_lock = asyncio.Lock()
        self._sem = asyncio.Semaphore(MAX_STRIPES_IN_FLIGHT)
        for slot in slots:
            self.attach(slot)

    # -- block device interface --------------------------------------------
    @property
    def size(self) -> int:
        return self.geom.size

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{self.name}: I/O {offset}+{length} beyond {self.size}")

    def _split(self, offset: int, length: int) -> dict[int, list[tuple[int, int, int, int]]]:
        """stripe -> [(data index, lo, hi, position in the caller's buffer)]."""
        out: dict[int, list[tuple[int, int, int, int]]] = {}
        pos = 0
        while pos < length:
            s, index, within = self.geom.locate(offset + pos)
            n = min(self.geom.chunk_size - within, length - pos)
            out.setdefault(s, []).append((index, within, within + n, pos))
            pos += n
        return out

    def _runs(self, split: dict[int, list[tuple[int, int, int, int]]]
              ) -> list[tuple[int, int, int]]:
        """Consecutive whole stripes of `split` as runs (first, count, position),
        at most RUN_STRIPES long; the stripes they cover are removed from `split`."""
        whole = [s for s, items in split.items() if len(items) == self.geom.data_chunks
                 and all(lo == 0 and hi == self.geom.chunk_size for _, lo, hi, _ in items)]
        runs: list[tuple[int, int, int]] = []
        for s in sorted(whole):
            if runs and runs[-1][0] + runs[-1][1] == s and runs[-1][1] < RUN_STRIPES:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1, runs[-1][2])
            else:
                runs.append((s, 1, split[s][0][3]))
        for first, count, _ in runs:
            if count > 1:
                for s in range(first, first + count):
                    del split[s]
        return [r for r in runs if r[1] > 1]

    @contextlib.asynccontextmanager
    async def _hold(self, first: int, count: int) -> AsyncIterator[None]:
        """The slot and the locks of stripes first..first+count-1 (in order, so no deadlock)."""
        async with self._sem, contextlib.AsyncExitStack() as stack:
            for s in range(first, first + count):
                await stack.enter_async_context(self.locks.hold(s))
            yield

    def _whole(self, stripe: int, pos: int) -> list[tuple[int, int, int, int]]:
        """Items of a whole stripe whose bytes sit at `pos` of the caller's buffer."""
        c = self.geom.chunk_size
        return [(i, 0, c, pos + i * c) for i in range(self.geom.data_chunks)]

    def _whole_and_healthy(self, first: int, count: int) -> bool:
        return all(not self.missing(s) for s in range(first, first + count))

    async def read(self, offset: int, length: int) -> bytearray:
        """Array bytes; checksum failures are repaired from parity, never returned."""
        self._check_range(offset, length)
        out = bytearray(length)
        split = self._split(offset, length)
        runs = self._runs(split)

        async def one(s: int, items: list[tuple[int, int, int, int]]) -> None:
            for index, lo, hi, pos in items:
                chunk = await stripe_ops.read_chunk(self, s, index, lo, hi)
                out[pos:pos + hi - lo] = chunk.data

        async def stripe(s: int, items: list[tuple[int, int, int, int]]) -> None:
            async with self._hold(s, 1):
                await one(s, items)

        async def run(first: int, count: int, pos: int) -> None:
            async with self._hold(first, count):
                size = count * self.geom.stripe_data_size
                if self._whole_and_healthy(first, count) and await stripe_ops.read_full_stripes(
                        self, first, count, memoryview(out)[pos:pos + size]):
                    return
                for s in range(first, first + count):
                    await one(s, self._whole(s, pos + (s - first) * self.geom.stripe_data_size))
        await asyncio.gather(*(stripe(s, items) for s, items in split.items()),
                             *(run(*r) for r in runs))
        return out  # a bytearray: bytes-like, and one copy fewer

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Durable on return when `fua`; otherwise once a later flush returns.
        If cancelled, stripes not yet begun keep their old bytes and a stripe
        update already begun is finished before the cancellation is raised."""
        self._check_range(offset, len(data))
        if self.failed:
            raise self.failed
        view = memoryview(data)
        split = self._split(offset, len(data))
        regions = {self.region(s) for s in split}
        runs = self._runs(split)
        for r in regions:
            self._inflight[r] += 1
        try:
            await self.mark_dirty(regions)

            async def one(s: int, items: list[tuple[int, int, int, int]]) -> None:
                if self.failed:
                    raise self.failed
                pieces = {index: (lo, view[pos:pos + hi - lo]) for index, lo, hi, pos in items}
                await run_to_end(stripe_ops.write_chunks(self, s, pieces, fua))

            async def stripe(s: int, items: list[tuple[int, int, int, int]]) -> None:
                async with self._hold(s, 1):
                    await one(s, items)

            async def run(first: int, count: int, pos: int) -> None:
                async with self._hold(first, count):
                    if self.failed:
                        raise self.failed
                    if self._whole_and_healthy(first, count) and not any(
                            self.has_live_record(s) for s in range(first, first + count)):
                        size = count * self.geom.stripe_data_size
                        try:
                            await run_to_end(stripe_ops.write_full_stripes(
                                self, first, view[pos:pos + size], fua))
                            return
                        except MemberLost:
                            pass
                    for s in range(first, first + count):
                        await one(s, self._whole(s, pos + (s - first) * self.geom.stripe_data_size))

            await asyncio.gather(*(stripe(s, items) for s, items in split.items()),
                                 *(run(*r) for r in runs))
        finally:
            for r in regions:
                self._inflight[r] -= 1
                if not self._inflight[r]:
                    del self._inflight[r]
                self._written_gen[r] = self._flush_gen

    async def flush(self) -> None:
        """Every write acknowledged before this call is durable when it returns.

        Flushes may overlap. Each has a generation; it clears the bit of a
        region only if every write to it ended before the flush began, i.e.
        before it sent its member flushes: a bit is cleared only once the
        writes it guards are durable."""
        if self.failed:
            raise self.failed
        self._flush_gen += 1
        generation = self._flush_gen
        retired = min(self._live_seqs) - 1 if self._live_seqs else self._seq
        live = self.live_roles()
        lost = await asyncio.gather(*(self._write_back(r) for r in live))
        await self.flush_members([r for r in live if r not in lost])
        if self.failed:
            raise self.failed
        self._retired = max(self._retired, retired)
        self._written_gen = {r: g for r, g in self._written_gen.items() if g >= generation}
        await self._clear_clean_regions(generation)
        if self._retired > self.retired_durable:
            # log records of updates this flush made durable must never be replayed
            await self.mark_dirty(set(), force=True)

    async def flush_members(self, roles: list[int]) -> None:
        """Flush the members of `roles`; failures mark them faulty."""
        starts = {}
        for r in roles:
            self._flush_epoch[r] += 1
            starts[r] = self._flush_epoch[r]
        results = await asyncio.gather(
            *(self.slots[r].member.flush() for r in roles),  # type: ignore[union-attr]
            return_exceptions=True)
        lost = await self.settle(roles, results)
        for r in roles:
            if r not in lost:
                self._durable_epoch[r] = max(self._durable_epoch[r], starts[r])
        self._unflushed_chunks = {key: e for key, e in self._unflushed_chunks.items()
                                  if e >= self._durable_epoch[key[1]]}

    def note_written(self, stripe: int, role: int) -> None:
        """A write to `role`'s chunk of `stripe` completed (durable after its next flush)."""
        self._unflushed_chunks[(stripe, role)] = self._flush_epoch[role]

    async def make_durable(self, stripe: int, roles: set[int]) -> None:
        """Flush those of `roles` whose chunk of `stripe` has unflushed writes.

        A log record's partial parity is computed from the untouched blocks of
        its stripe; a crash must not be able to roll those blocks back."""
        need = [r for r in sorted(roles)
                if self._unflushed_chunks.get((stripe, r), -1) >= self._durable_epoch[r]]
        if need:
            await self.flush_members(need)

    async def _write_back(self, role: int) -> int | None:
        csums = self.slots[role].csums
        try:
            if csums is not None:
                await csums.write_back()
        except MemberLost:
            return role
        return None

    # -- member state ------------------------------------------------------
    def attach(self, slot: Slot) -> None:
        """Give a slot its log ring and checksum table (after its member changes)."""
        if slot.member is None:
            slot.ring = slot.csums = None
            return
        role = slot.role

        async def read(offset: int, length: int) -> bytes:
            return await self.mread(role, offset, length)

        async def write(offset: int, data: bytes, fua: bool) -> None:
            await self.mwrite(role, offset, data, fua)

        slot.ring = PPLRing(slot.name, self.geom.ppl_size, slot.write, self.make_room)
        slot.csums = ChecksumTable(slot.name, self.geom.csum_offset, read, write)

    @property
    def csums(self) -> list[ChecksumTable]:
        return [s.csums for s in self.slots]  # type: ignore[misc]

    def member_name(self, role: int) -> str:
        return self.slots[role].name

    def live_roles(self) -> list[int]:
        return [s.role for s in self.slots if s.member is not None and s.state is not MemberState.FAULTY]

    def region(self, stripe: int) -> int:
        return stripe // self.region_stripes

    def region_stripes_of(self, region: int) -> range:
        return range(region * self.region_stripes,
                     min(self.geom.stripes, (region + 1) * self.region_stripes))

    def valid(self, role: int, stripe: int) -> bool:
        """Does `role` hold current chunks for `stripe`?"""
        slot = self.slots[role]
        if slot.state is MemberState.IN_SYNC:
            return True
        if slot.state is MemberState.REBUILDING:
            return stripe < slot.recovery_stripe
        if slot.state is MemberState.RESYNCING:
            region = self.region(stripe)
            return region not in slot.stale_regions or (
                region == slot.resync_region and stripe < slot.resync_cursor)
        return False

    def missing(self, stripe: int) -> list[int]:
        return [r for r in range(self.geom.members) if not self.valid(r, stripe)]

    def missing_one(self, stripe: int) -> int | None:
        """The one role `stripe` must do without, or None; ArrayFailed if more."""
        gone = self.missing(stripe)
        if len(gone) > 1:
            names = ", ".join(self.member_name(r) for r in gone)
            raise self.failed or ArrayFailed(
                f"{self.name}: stripe {stripe} has lost {names}; RAID5 survives one member only")
        return gone[0] if gone else None

    async def mread(self, role: int, offset: int, length: int) -> bytes:
        try:
            return await self.slots[role].read(offset, length)
        except OSError as exc:
            await self.fail(role, exc)
            raise MemberLost(role) from exc

    async def mwrite(self, role: int, offset: int, data: bytes, fua: bool) -> None:
        try:
            await self.slots[role].write(offset, data, fua)
        except OSError as exc:
            await self.fail(role, exc)
            raise MemberLost(role) from exc

    async def write_member(self, role: int, offset: int, data: bytes, fua: bool) -> None:
        """Write to `role`'s member with no failure handling (callers `settle`)."""
        await self.slots[role].write(offset, data, fua)

    def ppl_generation(self, role: int) -> int:
        return self.slots[role].ppl_generation

    async def ppl_append(self, role: int, record: PPLRecord, payload: bytes) -> int:
        """Append `record` (FUA) to `role`'s ring; from then on it is the newest
        record of its stripe. Returns its ticket."""
        ring = self.slots[role].ring
        if ring is None:
            raise MemberLost(role)
        try:
            ticket = await ring.append(record, payload)
        except OSError as exc:
            await self.fail(role, exc)
            raise MemberLost(role) from exc
        self.logged[record.stripe] = record.seq
        return ticket

    def has_live_record(self, stripe: int) -> bool:
        """Could a crash now replay a log record of `stripe`? Then a full-stripe
        write must log too, to supersede it."""
        return self.logged.get(stripe, 0) > self.retired_durable

    async def ppl_mark_durable(self, role: int, seq: int) -> None:
        """A FUA update is durable: its log record must not be replayed any more."""
        ring = self.slots[role].ring
        if ring is None:
            raise MemberLost(role)
        try:
            await ring.mark_durable(seq)
        except OSError as exc:
            await self.fail(role, exc)
            raise MemberLost(role) from exc

    def next_seq(self) -> int:
        """A new log record seq; it stays live until `seq_done`."""
        self._seq += 1
        self._live_seqs.add(self._seq)
        return self._seq

    async def seq_done(self, role: int, seq: int) -> None:
        """The update logged as `seq` on `role`'s ring is written (not yet flushed)."""
        self._live_seqs.discard(seq)
        ring = self.slots[role].ring
        if ring is not None:
            await ring.complete(seq)

    def resume_seq(self, seq: int, retired: int) -> None:
        """At assembly: continue after the newest log record and the retired seq found."""
        self._seq = max(self._seq, seq, retired)
        self._retired = self.retired_durable = max(self.retired_durable, retired)

    async def make_room(self) -> None:
        """Flush, then record durably (bitmap, FUA) that the flushed log records
        are obsolete, so log rings may reuse their space."""
        async with self._room_lock:
            await self.flush()
            await self.mark_dirty(set(), force=True)

    async def fail(self, role: int, exc: BaseException | None = None) -> None:
        """Mark `role` faulty (idempotent). A second lost member fails the array."""
        slot = self.slots[role]
        if slot.state is MemberState.FAULTY:
            return
        before = slot.state
        slot.state = MemberState.FAULTY
        log.error("%s: member %s failed (%s); array %s", self.name, slot.name,
                  exc or "removed", self.state_string())
        others = [s.name for s in self.slots if s is not slot and s.state is not MemberState.IN_SYNC]
        if before is MemberState.IN_SYNC and others and self.failed is None:
            self.failed = ArrayFailed(
                f"{self.name}: {slot.name} failed while {', '.join(others)} "
                f"was already out of sync; writes stopped to avoid corruption")
            log.error("%s", self.failed)
        await self.write_superblocks()

    def superblock_for(self, role: int) -> Superblock:
        slot = self.slots[role]
        recovery = {MemberState.IN_SYNC: self.geom.stripes,
                    MemberState.REBUILDING: slot.checkpoint}.get(slot.state, 0)
        return Superblock(
            array_uuid=self.uuid, member_uuid=slot.member_uuid, role=role,
            members=self.geom.members, chunk_size=self.geom.chunk_size,
            region_stripes=self.region_stripes, ppl_size=self.geom.ppl_size, events=self.events,
            stripes=self.geom.stripes, recovery_stripe=recovery, scrub_stripe=self.scrub_stripe,
            ppl_generation=slot.ppl_generation,
            role_states=tuple(s.state for s in self.slots),
            role_uuids=tuple(s.member_uuid for s in self.slots), clean=self.clean)

    async def write_superblocks(self, bump: bool = True, roles: list[int] | None = None) -> None:
        """Write (FUA) the superblock of every live member, bumping events."""
        async with self._sb_lock:
            if bump:
                self.events += 1
            targets = self.live_roles() if roles is None else roles
            results = await asyncio.gather(
                *(self.slots[r].write(SUPERBLOCK_OFFSET, self.superblock_for(r).to_bytes(), True)
                  for r in targets), return_exceptions=True)
        await self.settle(targets, results)

    async def settle(self, roles: list[int], results: list) -> list[int]:
        """After a gather(return_exceptions=True) over `roles`: re-raise anything
        that is not a member error, mark failed members faulty, return them."""
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, OSError):
                raise res
        lost = [r for r, res in zip(roles, results) if isinstance(res, OSError)]
        for r, res in zip(roles, results):
            if isinstance(res, OSError):
                await self.fail(r, res)
        return lost

    # -- write-intent bitmap -----------------------------------------------
    @property
    def dirty_regions(self) -> set[int]:
        return set(self._dirty)

    async def mark_dirty(self, regions: set[int], force: bool = False) -> None:
        """Return once every region in `regions` is durably dirty on every live
        member (`force`: rewrite the bitmap even if nothing changed)."""
        if regions <= self._durable and not force:
            return
        self._dirty |= regions
        async with self._bm_lock:
            if regions <= self._durable and not force:
                return
            await self._write_bitmap(fua=True)

    async def _write_bitmap(self, fua: bool) -> None:
        """Write the bitmap of `_dirty` now. `_durable` keeps only bits set on
        disk whatever becomes of this write: a bit it clears stops counting at
        once (a write starting meanwhile must set it again), and only a FUA
        write makes the bits it sets count."""
        snapshot = set(self._dirty)
        retired = self._retired
        record = BitmapRecord.from_regions(self.events, retired, self.region_stripes,
                                           self.nregions, snapshot).to_bytes()
        live = self.live_roles()
        self._durable &= snapshot
        await self.settle(live, await asyncio.gather(
            *(self.slots[r].write(BITMAP_OFFSET, record, fua) for r in live),
            return_exceptions=True))
        if self.failed:
            raise self.failed
        self._durable = snapshot if fua else self._durable & snapshot
        if fua and retired > self.retired_durable:
            self.retired_durable = retired
            self.logged = {s: q for s, q in self.logged.items() if q > retired}
            for slot in self.slots:
                if slot.ring is not None:
                    await slot.ring.retire(retired)

    def can_clear_bits(self) -> bool:
        """Bits record what an absent or resyncing member missed: keep them then."""
        return all(s.state in (MemberState.IN_SYNC, MemberState.REBUILDING) for s in self.slots)

    async def _clear_clean_regions(self, generation: int) -> None:
        """After flush `generation` returned from the members: clear the bits of
        regions with no write in flight and none ended since that flush began."""
        if not self.can_clear_bits():
            return
        async with self._bm_lock:
            clear = {r for r in self._dirty
                     if not self._inflight[r] and self._written_gen.get(r, 0) < generation
                     and r not in self.pending_resync}
            if clear:
                self._dirty -= clear
                await self._write_bitmap(fua=False)

    # -- state for humans --------------------------------------------------
    def state_string(self) -> str:
        """md-like: one character per role, U in sync, _ failed, missing or not yet rebuilt."""
        return "".join("U" if s.state is MemberState.IN_SYNC else "_" for s in self.slots)

    def status(self) -> dict:
        return {
            "name": self.name,
            "uuid": self.uuid.hex(),
            "state": self.state_string(),
            "size": self.size,
            "chunk_size": self.geom.chunk_size,
            "failed": str(self.failed) if self.failed else None,
            "members": [{"role": s.role, "name": s.name, "state": s.state.name.lower()}
                        for s in self.slots],
            "dirty_regions": len(self._dirty),
            "phases": {k.value: p.describe() for k, p in self.phases.items()},
            "repaired": dict(self.stats.repaired),
            "unrecoverable": self.stats.unrecoverable,
            "last_scrub": self.last_scrub.summary() if self.last_scrub else None,
        }

    async def wait_idle(self) -> None:
        """Wait for background phases (rebuild, resync) to end; re-raise their errors."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks))

    async def stop(self) -> None:
        """Clean shutdown: flush, clear the bitmap where possible, mark clean."""
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*list(self.tasks), return_exceptions=True)
        await self.flush()
        self.clean = True
        await self.write_superblocks(bump=False)
