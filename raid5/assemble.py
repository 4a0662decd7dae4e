"""Creating an array and assembling one from its members.

`assemble` takes members in any order, reads their superblocks and trusts the
newest (highest events). It refuses a foreign member, a stale one (failed or
replaced according to the newest superblock), and two missing members; it
starts degraded with one missing. After an unclean stop it resyncs only the
regions dirty in the write-intent bitmap, replaying partial-parity records.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Sequence

from . import recovery
from .bitmap import MAX_REGIONS, BitmapRecord
from .engine import Array, Slot
from .errors import AssemblyError, IntegrityError
from .geometry import BITMAP_OFFSET, BLOCK, DEFAULT_CHUNK, DEFAULT_PPL_SIZE, PPL_OFFSET, Geometry
from .member import Member
from .ppl import PPLRecord
from .ring import scan
from .superblock import MemberState, Superblock

log = logging.getLogger(__name__)

DEFAULT_REGION_BYTES = 16 << 20


def _region_stripes(geom: Geometry, wanted: int | None) -> int:
    if wanted is None:
        wanted = max(1, DEFAULT_REGION_BYTES // geom.stripe_data_size)
    return max(wanted, -(-geom.stripes // MAX_REGIONS))


async def create(members: Sequence[Member], *, chunk_size: int = DEFAULT_CHUNK,
                 ppl_size: int = DEFAULT_PPL_SIZE, region_stripes: int | None = None,
                 journal: bool = True, name: str = "md0", assume_clean: bool = False) -> Array:
    """Write fresh metadata to `members` (role = position). Without
    `assume_clean`, parity is computed over the whole array before returning.
    `journal=False` is a test-only switch that opens the write hole on purpose."""
    if len(members) < 2:
        raise AssemblyError(f"{name}: RAID5 needs at least 2 members, got {len(members)}")
    geom = Geometry.fit(min(m.size for m in members), len(members), chunk_size, ppl_size)
    rs = _region_stripes(geom, region_stripes)
    nregions = -(-geom.stripes // rs)
    slots = [Slot(r, m, MemberState.IN_SYNC, os.urandom(16), ppl_generation=1)
             for r, m in enumerate(members)]
    dirty = set() if assume_clean else set(range(nregions))
    arr = Array(geom, os.urandom(16), slots, region_stripes=rs, events=0, dirty_regions=dirty,
                journal=journal, name=name)
    zero = bytes(min(geom.csum_blocks * BLOCK, 1 << 20))

    async def wipe(m: Member) -> None:
        for at in range(0, geom.csum_blocks * BLOCK, len(zero)):
            n = min(len(zero), geom.csum_blocks * BLOCK - at)
            await m.write(geom.csum_offset + at, zero[:n])
        await m.flush()

    await asyncio.gather(*(wipe(m) for m in members))
    await arr.write_superblocks()
    await arr.mark_dirty(dirty, force=True)
    log.info("%s: created, %d members, chunk %d, %d stripes, %d bytes", name, geom.members,
             chunk_size, geom.stripes, geom.size)
    await recovery.resync_dirty(arr, {})
    return arr


async def _read_superblock(m: Member) -> Superblock | None:
    try:
        return Superblock.from_bytes(await m.read(0, BLOCK))
    except IntegrityError as exc:
        raise AssemblyError(f"{m.name}: not an Opie RAID5 member ({exc})") from exc
    except OSError as exc:
        log.error("%s: superblock unreadable, treating member as missing: %s", m.name, exc)
        return None


async def assemble(members: Sequence[Member], *, journal: bool = True, name: str = "md0",
                   start_recovery: bool = True, rate: float | None = None) -> Array:
    """Assemble from `members` (any order). See the module docstring for refusals.
    Rebuild or resync left unfinished resumes in the background (`start_recovery`).
    `journal=False` is the test-only switch of `create`."""
    found = [(m, sb) for m, sb in zip(members, await asyncio.gather(
        *(_read_superblock(m) for m in members))) if sb is not None]
    if not found:
        raise AssemblyError(f"{name}: no readable member")
    votes = Counter(sb.array_uuid for _, sb in found)
    main = votes.most_common(1)[0][0]
    for m, sb in found:
        if sb.array_uuid != main:
            raise AssemblyError(f"{m.name}: foreign member of array {sb.array_uuid.hex()}, "
                                f"not {main.hex()}")
    newest = max((sb for _, sb in found), key=lambda sb: sb.events)
    by_role: dict[int, tuple[Member, Superblock]] = {}
    for m, sb in found:
        if sb.role >= newest.members:
            raise AssemblyError(f"{m.name}: role {sb.role} outside an array of {newest.members}")
        if newest.role_uuids[sb.role] != sb.member_uuid:
            raise AssemblyError(f"{m.name}: stale: role {sb.role} now belongs to another member "
                                f"(events {sb.events}, array at {newest.events})")
        if newest.role_states[sb.role] is MemberState.FAULTY:
            raise AssemblyError(f"{m.name}: stale: failed at events {sb.events}, array at "
                                f"{newest.events}; re-add it after assembly")
        if sb.role in by_role:
            raise AssemblyError(f"{m.name}: role {sb.role} given twice "
                                f"(also {by_role[sb.role][0].name})")
        by_role[sb.role] = (m, sb)
    geom = newest.geometry
    slots: list[Slot] = []
    changed = False
    for role in range(geom.members):
        state = newest.role_states[role]
        if role in by_role:
            m, sb = by_role[role]
            slot = Slot(role, m, state, sb.member_uuid, sb.ppl_generation, sb.recovery_stripe)
        else:
            if state is not MemberState.FAULTY:
                changed = True
                log.error("%s: member for role %d missing, starting degraded", name, role)
            slot = Slot(role, None, MemberState.FAULTY, newest.role_uuids[role])
        slots.append(slot)
    unhealthy = [s for s in slots if s.state is not MemberState.IN_SYNC]
    if len(unhealthy) > 1:
        raise AssemblyError(f"{name}: refusing to assemble: "
                            f"{', '.join(s.name for s in unhealthy)} missing or out of sync; "
                            f"RAID5 survives one member only")
    dirty: set[int] = set()
    retired = 0
    for m, sb in found:
        try:
            bm = BitmapRecord.from_bytes(await m.read(BITMAP_OFFSET, BLOCK))
        except IntegrityError as exc:
            log.warning("%s: bitmap unreadable (%s)", m.name, exc)
            continue
        dirty |= set(bm.dirty_regions())
        retired = max(retired, bm.retired_seq)
    arr = Array(geom, main, slots, region_stripes=newest.region_stripes, events=newest.events,
                dirty_regions=dirty, journal=journal, name=name, scrub_stripe=newest.scrub_stripe)
    for slot in slots:
        if slot.state is MemberState.RESYNCING:
            slot.stale_regions = set(dirty)
    records = await _scan_rings(arr, retired) if journal else {}
    await arr.write_superblocks(bump=changed)
    if dirty:
        log.warning("%s: unclean stop, resyncing %d dirty regions", name, len(dirty))
    await recovery.resync_dirty(arr, records)
    await arr.make_room()
    if start_recovery:
        for slot in slots:
            if slot.state is MemberState.REBUILDING:
                recovery.start(arr, recovery.rebuild(arr, slot.role, rate=rate))
            elif slot.state is MemberState.RESYNCING:
                recovery.start(arr, recovery.resync_member(arr, slot.role, rate=rate))
    log.info("%s: assembled %s", name, arr.state_string())
    return arr


async def _scan_rings(arr: Array, retired: int) -> dict[int, list[tuple[PPLRecord, bytes]]]:
    """Live log records (seq above `retired`) per stripe, newest first."""
    live: dict[int, list[tuple[PPLRecord, bytes]]] = {}
    top = 0
    for role in arr.live_roles():
        slot = arr.slots[role]
        raw = await arr.mread(role, PPL_OFFSET, arr.geom.ppl_size)
        last_end, last_seq = 0, -1
        for pos, rec, payload in scan(raw, arr.uuid, slot.ppl_generation, arr.geom.data_chunks):
            if rec.stripe >= arr.geom.stripes or arr.geom.parity_role(rec.stripe) != role:
                continue
            arr.logged[rec.stripe] = max(arr.logged.get(rec.stripe, 0), rec.seq)
            top = max(top, rec.seq)
            if rec.seq > last_seq:
                last_seq, last_end = rec.seq, pos + rec.length
            if rec.seq > retired:
                live.setdefault(rec.stripe, []).append((rec, payload))
        if slot.ring is not None:
            slot.ring.resume_after(last_end)
    arr.resume_seq(top, retired)
    for records in live.values():
        records.sort(key=lambda rp: -rp[0].seq)
    return live
