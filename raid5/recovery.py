"""Making stripes whole again: crash resync, rebuild, and re-add after an absence.

* `resync_dirty` runs at assembly after an unclean stop: only stripes in
  regions dirty in the write-intent bitmap are touched. Parity is made
  consistent by replaying the stripe's newest partial-parity record (or
  recomputed from data when it has none), then checksums are recomputed.
  The checkpoint is the bitmap: bits clear only when it is done.
* `rebuild` writes a replacement member whole, in the background, rate
  limited; its checkpoint is the member's recovery stripe in its superblock.
* `resync_member` copies to a member that came back only the regions dirty
  in the bitmap, which was kept while it was away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Awaitable, Callable

import numpy as np

from . import stripe as stripe_ops
from .errors import ArrayFailed, AssemblyError, IntegrityError, MemberLost
from .geometry import BLOCK, SUPERBLOCK_OFFSET
from .member import Member
from .parity import xor_all, xor_into
from .phases import Phase, PhaseEvent, PhaseKind
from .ppl import PPLRecord
from .engine import Array
from .superblock import MemberState, Superblock

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


async def retag(arr: Array, s: int) -> None:
    """Recompute the stored checksums of stripe `s` on every member valid for it."""
    for r in range(arr.geom.members):
        if arr.valid(r, s):
            raw = await arr.mread(r, arr.geom.chunk_offset(s), arr.geom.chunk_size)
            await arr.csums[r].update(stripe_ops.block_no(arr, s, 0),
                                      stripe_ops.block_tags(raw))


async def resync_stripe(arr: Array, s: int, records: list[tuple[PPLRecord, bytes]]) -> None:
    """Make parity of stripe `s` consistent with its data after a crash.

    With every member present parity is recomputed from the data. With a data
    member missing its chunk exists only as parity, so each row is replayed
    from the newest live log record covering it: parity = partial parity XOR
    the current modified blocks, where a modified block on the missing member
    counts as its old contents if the update covered it only in part (an edge)
    and as zeros if it was rewritten whole. Rows no live record covers were
    flushed."""
    geom = arr.geom
    gone = arr.missing(s)
    p = geom.parity_role(s)
    base = geom.chunk_offset(s)
    roles = [geom.data_role(s, i) for i in range(geom.data_chunks)]
    if len(gone) > 1:
        log.error("%s: stripe %d cannot be resynced: %d members missing", arr.name, s, len(gone))
        return
    if not gone:
        data = [await arr.mread(r, base, geom.chunk_size) for r in roles]
        await arr.mwrite(p, base, xor_all(data, geom.chunk_size).tobytes(), False)
    elif p not in gone and arr.journal:
        parity = np.frombuffer(await arr.mread(p, base, geom.chunk_size), dtype=np.uint8).copy()
        done: set[int] = set()
        for rec, payload in records:                       # newest first
            edges = {e: rec.pp_length + k * BLOCK for k, e in enumerate(rec.edges)}
            for row in range(rec.first_row, rec.first_row + rec.rows):
                if row in done:
                    continue
                done.add(row)
                if rec.done:
                    continue            # a durable (FUA) update: parity is right as it is
                rel = (row - rec.first_row) * BLOCK
                value = (np.zeros(BLOCK, dtype=np.uint8) if rec.full else
                         np.frombuffer(payload[rel:rel + BLOCK], dtype=np.uint8).copy())
                for i, (lo, hi) in enumerate(rec.modified):
                    if not lo <= row < hi:
                        continue
                    if roles[i] not in gone:
                        xor_into(value, await arr.mread(roles[i], base + row * BLOCK, BLOCK))
                    elif (i, row) in edges:     # keep the bytes the update did not touch
                        at = edges[(i, row)]
                        xor_into(value, payload[at:at + BLOCK])
                    # else: the lost block was rewritten whole and unflushed: it reads as zeros
                parity[row * BLOCK:(row + 1) * BLOCK] = value
        if any(not rec.done for rec, _ in records):
            await arr.mwrite(p, base, parity.tobytes(), False)
    await retag(arr, s)


async def resync_dirty(arr: Array, records: dict[int, list[tuple[PPLRecord, bytes]]]) -> None:
    """Crash recovery over the bitmap's dirty regions (never the whole array)."""
    regions = sorted(arr.dirty_regions)
    if not regions:
        return
    arr.pending_resync = set(regions)
    stripes = [s for r in regions for s in arr.region_stripes_of(r)]
    phase = Phase(PhaseKind.RESYNC, total=len(stripes))
    arr.phases[PhaseKind.RESYNC] = phase
    phase.fire(PhaseEvent.START, f"{len(regions)} dirty regions after unclean stop")
    try:
        for s in stripes:
            while True:
                try:
                    async with arr.locks.hold(s):
                        await resync_stripe(arr, s, records.get(s, []))
                    break
                except MemberLost:
                    continue
            phase.done += 1
        arr.pending_resync = set()
        await arr.flush()
    except ArrayFailed as exc:
        phase.fire(PhaseEvent.FAIL, str(exc))
        raise
    phase.fire(PhaseEvent.FINISH)


async def copy_stripe(arr: Array, s: int, role: int) -> None:
    """Write `role`'s chunk of stripe `s`, computed from the other members
    (made durable first: a crash must not roll back what the copy is made of)."""
    await arr.make_durable(s, {r for r in range(arr.geom.members) if r != role})
    data = await stripe_ops.reconstruct(arr, s, role, 0, arr.geom.chunk_size)
    await stripe_ops.write_extents(arr, s, [(role, 0, data)], fua=False)


class RateLimit:
    """Sleeps so that `bytes_per_second` is not exceeded (None: unlimited)."""

    def __init__(self, bytes_per_second: float | None, sleep: Sleep = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = bytes_per_second
        self.sleep = sleep
        self.clock = clock
        self.start = clock()
        self.moved = 0

    async def spend(self, nbytes: int) -> None:
        self.moved += nbytes
        if self.rate:
            ahead = self.moved / self.rate - (self.clock() - self.start)
            if ahead > 0:
                await self.sleep(ahead)


async def _save_member(arr: Array, role: int) -> None:
    """Make `role`'s chunks and checksums durable, then write its superblock."""
    slot = arr.slots[role]
    if slot.csums is not None:
        await slot.csums.write_back()
    try:
        await slot.member.flush()  # type: ignore[union-attr]
    except OSError as exc:
        await arr.fail(role, exc)
        raise MemberLost(role) from exc


async def _copy_one(arr: Array, s: int, role: int, state: MemberState, limit: RateLimit,
                    advance: Callable[[], None]) -> None:
    """Copy stripe `s` to `role` under the stripe lock, then `advance` the cursor."""
    async with arr.locks.hold(s):
        if arr.slots[role].state is not state:
            raise MemberLost(role)
        await copy_stripe(arr, s, role)
        advance()
    await limit.spend(arr.geom.chunk_size * arr.geom.members)


async def _run(arr: Array, role: int, phase: Phase, work: Awaitable[None]) -> None:
    """Run a copy phase; on success `role` is in sync, on member loss the phase fails."""
    slot = arr.slots[role]
    try:
        await work
        await _save_member(arr, role)
        slot.state = MemberState.IN_SYNC
        slot.checkpoint = arr.geom.stripes
        await arr.write_superblocks()
    except (MemberLost, ArrayFailed) as exc:
        phase.fire(PhaseEvent.FAIL, str(exc))
        log.error("%s: %s of %s stopped: %s", arr.name, phase.kind.value, slot.name, exc)
        return
    phase.fire(PhaseEvent.FINISH)
    log.info("%s: %s of %s done, array %s", arr.name, phase.kind.value, slot.name,
             arr.state_string())


def rebuild(arr: Array, role: int, *, rate: float | None = None, checkpoint_every: int = 64,
            sleep: Sleep = asyncio.sleep,
            clock: Callable[[], float] = time.monotonic) -> Awaitable[None]:
    """Rebuild `role` (state REBUILDING) from its recovery stripe to the end.
    I/O continues meanwhile: stripes below the recovery stripe use the new member.
    The phase is visible in `arr.phases` as soon as this returns the coroutine."""
    slot = arr.slots[role]
    phase = Phase(PhaseKind.REBUILD, total=arr.geom.stripes, done=slot.recovery_stripe)
    arr.phases[PhaseKind.REBUILD] = phase
    limit = RateLimit(rate, sleep, clock)

    async def work() -> None:
        phase.fire(PhaseEvent.START, f"{slot.name} from stripe {slot.recovery_stripe}")
        for s in range(slot.recovery_stripe, arr.geom.stripes):
            await _copy_one(arr, s, role, MemberState.REBUILDING, limit,
                            lambda: setattr(slot, "recovery_stripe", s + 1))
            phase.done = s + 1
            if (s + 1) % checkpoint_every == 0:
                await _save_member(arr, role)
                slot.checkpoint = slot.recovery_stripe
                await arr.write_superblocks(bump=False, roles=[role])

    return _run(arr, role, phase, work())


def resync_member(arr: Array, role: int, *, rate: float | None = None,
                  sleep: Sleep = asyncio.sleep) -> Awaitable[None]:
    """Copy to a returning member (RESYNCING) only the regions it missed."""
    slot = arr.slots[role]
    regions = sorted(slot.stale_regions)
    total = sum(len(arr.region_stripes_of(r)) for r in regions)
    phase = Phase(PhaseKind.RESYNC, total=total)
    arr.phases[PhaseKind.RESYNC] = phase
    limit = RateLimit(rate, sleep)

    async def work() -> None:
        phase.fire(PhaseEvent.START, f"{slot.name}: {len(regions)} regions missed while away")
        for region in regions:
            slot.resync_region = region
            for s in arr.region_stripes_of(region):
                await _copy_one(arr, s, role, MemberState.RESYNCING, limit,
                                lambda: setattr(slot, "resync_cursor", s + 1))
                phase.done += 1
            slot.stale_regions.discard(region)

    return _run(arr, role, phase, work())


def start(arr: Array, coro: Awaitable[None]) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    arr.tasks.add(task)
    task.add_done_callback(arr.tasks.discard)
    return task


async def replace(arr: Array, member: Member, *, rate: float | None = None,
                  checkpoint_every: int = 64, sleep: Sleep = asyncio.sleep,
                  clock: Callable[[], float] = time.monotonic) -> asyncio.Task:
    """Put `member` in the failed role and start rebuilding it in the background."""
    faulty = [s for s in arr.slots if s.state is MemberState.FAULTY]
    if len(faulty) != 1 or arr.failed:
        raise AssemblyError(f"{arr.name}: replace needs exactly one failed member "
                            f"(array {arr.state_string()})")
    slot = faulty[0]
    if member.size < arr.geom.data_offset + arr.geom.stripes * arr.geom.chunk_size:
        raise AssemblyError(f"{member.name}: {member.size} bytes is too small for this array")
    slot.member = member
    slot.member_uuid = os.urandom(16)
    slot.ppl_generation = arr.events + 1
    slot.state = MemberState.REBUILDING
    slot.checkpoint = slot.recovery_stripe = 0
    arr.attach(slot)
    log.info("%s: rebuilding role %d onto %s", arr.name, slot.role, member.name)
    await arr.write_superblocks()
    await arr.mark_dirty(set(), force=True)
    return start(arr, rebuild(arr, slot.role, rate=rate, checkpoint_every=checkpoint_every,
                              sleep=sleep, clock=clock))


async def re_add(arr: Array, member: Member, *, rate: float | None = None,
                 sleep: Sleep = asyncio.sleep) -> asyncio.Task:
    """Take back a member that was away: resync only what it missed, in the background."""
    try:
        sb = Superblock.from_bytes(await member.read(SUPERBLOCK_OFFSET, BLOCK))
    except IntegrityError as exc:
        raise AssemblyError(f"{member.name}: no Opie RAID5 superblock ({exc})") from exc
    if sb.array_uuid != arr.uuid:
        raise AssemblyError(f"{member.name}: foreign member of array {sb.array_uuid.hex()}, "
                            f"not {arr.uuid.hex()}")
    slot = arr.slots[sb.role]
    if slot.state is not MemberState.FAULTY:
        raise AssemblyError(f"{member.name}: role {sb.role} is {slot.state.name}, not failed")
    if sb.member_uuid != slot.member_uuid:
        raise AssemblyError(f"{member.name}: role {sb.role} was given to another member; "
                            f"add this one as a replacement instead")
    slot.member = member
    slot.ppl_generation = arr.events + 1
    slot.stale_regions = arr.dirty_regions
    slot.resync_region, slot.resync_cursor = -1, 0
    slot.state = MemberState.RESYNCING
    arr.attach(slot)
    log.info("%s: %s returns (events %d, array %d); %d regions to resync", arr.name,
             member.name, sb.events, arr.events, len(slot.stale_regions))
    await arr.write_superblocks()
    await arr.mark_dirty(set(), force=True)
    return start(arr, resync_member(arr, sb.role, rate=rate, sleep=sleep))
