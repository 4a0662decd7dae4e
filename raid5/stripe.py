"""The executor: performs read and write plans for one stripe.

Callers hold the stripe's lock. The executor works for any `StripeArray`
(the engine's `Array` is one) and never imports the engine. Every read of a
member block is checked against its stored checksum; a bad block is rebuilt
from the other members, written back (self-heal) and never returned corrupted. A member that fails
mid-operation is marked faulty by the array and the operation is planned
again without it (`MemberLost` never leaves this module's callers).
"""

from __future__ import annotations

import asyncio
import logging
import zlib

import numpy as np

from .checksums import block_tag, block_tags
from .errors import MemberLost, UnrecoverableBlock
from .geometry import BLOCK
from .parity import xor_all, xor_into
from .plan import WriteMode, WritePlan, _edges, _minus, plan_read, plan_write, run_layout
from .ppl import PPLRecord
from .stripe_array import StripeArray

log = logging.getLogger(__name__)


def block_no(arr: StripeArray, stripe: int, at: int) -> int:
    """Member block number of chunk byte `at` of `stripe`."""
    return (stripe * arr.geom.chunk_size + at) // BLOCK


async def heal_block(arr: StripeArray, stripe: int, role: int, at: int, bad: bytes,
                     stored: int) -> bytes:
    """Rebuild one block of `role` from the others; rewrite it if the result
    matches the stored checksum. Raises UnrecoverableBlock when it cannot."""
    geom = arr.geom
    where = f"{arr.member_name(role)}: stripe {stripe} block {at // BLOCK}"
    others = [r for r in range(geom.members) if r != role]
    if any(r in arr.missing(stripe) for r in others):
        arr.stats.unrecoverable += 1
        raise UnrecoverableBlock(f"{where}: checksum mismatch and the array is degraded")
    acc = np.zeros(BLOCK, dtype=np.uint8)
    for r in others:
        blk = await arr.mread(r, geom.chunk_offset(stripe) + at, BLOCK)
        (tag,) = await arr.csums[r].get(block_no(arr, stripe, at), 1)
        if tag and block_tag(blk) != tag:
            arr.stats.unrecoverable += 1
            raise UnrecoverableBlock(f"{where}: checksum mismatch, and {arr.member_name(r)} "
                                     f"is bad in the same row")
        xor_into(acc, blk)
    good = acc.tobytes()
    if good == bad:
        log.warning("%s: checksum was wrong, data matches parity; checksum rewritten", where)
        await arr.csums[role].update(block_no(arr, stripe, at), [block_tag(good)])
        return good
    if block_tag(good) != stored:
        arr.stats.unrecoverable += 1
        raise UnrecoverableBlock(f"{where}: checksum mismatch and parity disagrees")
    await arr.mwrite(role, geom.chunk_offset(stripe) + at, good, False)
    arr.stats.note_repair(arr.member_name(role))
    log.warning("%s: bad block repaired from parity", where)
    return good


async def read_verified(arr: StripeArray, stripe: int, role: int, lo: int, hi: int) -> np.ndarray:
    """Bytes [lo, hi) (block aligned) of `role`'s chunk of `stripe`, checksum-verified."""
    raw = await arr.mread(role, arr.geom.chunk_offset(stripe) + lo, hi - lo)
    buf = np.frombuffer(raw, dtype=np.uint8)
    stored = await arr.csums[role].get(block_no(arr, stripe, lo), (hi - lo) // BLOCK)
    view = memoryview(raw)
    for k, tag in enumerate(stored):
        blk = view[k * BLOCK:(k + 1) * BLOCK]
        if not tag or (zlib.crc32(blk) or 1) == tag:
            continue
        if not buf.flags.writeable:
            buf = buf.copy()
        good = await heal_block(arr, stripe, role, lo + k * BLOCK, bytes(blk), tag)
        buf[k * BLOCK:(k + 1) * BLOCK] = np.frombuffer(good, dtype=np.uint8)
    return buf


async def reconstruct(arr: StripeArray, stripe: int, role: int, lo: int, hi: int) -> np.ndarray:
    """Bytes [lo, hi) of `role`'s chunk computed from every other member."""
    others = [r for r in range(arr.geom.members) if r != role]
    parts = await asyncio.gather(*(read_verified(arr, stripe, r, lo, hi) for r in others))
    return xor_all(parts, hi - lo)


async def read_chunk(arr: StripeArray, stripe: int, index: int, lo: int, hi: int) -> np.ndarray:
    """Array data: bytes [lo, hi) of data chunk `index` of `stripe`."""
    while True:
        plan = plan_read(arr.geom, stripe, index, lo, hi, arr.missing_one(stripe))
        try:
            if plan.reconstruct:
                data = await reconstruct(arr, stripe, plan.role, plan.lo, plan.hi)
            else:
                data = await read_verified(arr, stripe, plan.role, plan.lo, plan.hi)
        except MemberLost:
            continue
        return data[lo - plan.lo:hi - plan.lo]


async def write_chunks(arr: StripeArray, stripe: int, pieces: dict[int, tuple[int, memoryview]],
                       fua: bool) -> None:
    """Write `pieces` (data index -> (offset in chunk, bytes)) into `stripe`."""
    modified = tuple((pieces[i][0], pieces[i][0] + len(pieces[i][1])) if i in pieces else (0, 0)
                     for i in range(arr.geom.data_chunks))
    while True:
        plan = plan_write(arr.geom, stripe, modified, arr.missing_one(stripe),
                          logged=arr.has_live_record(stripe))
        try:
            await execute_write(arr, plan, pieces, fua)
        except MemberLost:
            continue
        return


async def execute_write(arr: StripeArray, plan: WritePlan, pieces: dict[int, tuple[int, memoryview]],
                        fua: bool) -> None:
    geom = arr.geom
    s, p, m = plan.stripe, plan.parity_role, plan.missing
    w0, w1 = plan.window
    roles = [geom.data_role(s, i) for i in range(geom.data_chunks)]
    got = await asyncio.gather(*(read_verified(arr, s, e.role, e.start, e.end) for e in plan.reads))
    extents: dict[int, list[tuple[int, np.ndarray]]] = {}
    for e, buf in zip(plan.reads, got):
        extents.setdefault(e.role, []).append((e.start, buf))

    def old(role: int, a: int, b: int) -> np.ndarray:
        for start, buf in extents.get(role, ()):
            if start <= a and b <= start + len(buf):
                return buf[a - start:b - start]
        raise RuntimeError(f"plan for stripe {s} did not read role {role} [{a}, {b})")

    mi = geom.data_index(s, m) if m is not None else None
    if plan.mode is WriteMode.DEGRADED_WRITE and m is not None:
        recon = old(p, w0, w1).copy()
        for i, r in enumerate(roles):
            if i != mi:
                xor_into(recon, old(r, w0, w1))
        extents[m] = [(w0, recon)]

    new = _new_blocks(plan, roles, pieces, old)
    writes: list[tuple[int, int, np.ndarray]] = [
        (roles[i], ma, buf) for i, (ma, buf) in new.items() if roles[i] != m]
    ticket = None
    if plan.mode is not WriteMode.DATA_ONLY:
        pp = _partial_parity(plan, roles, new, old, mi)
        parity = None if pp is None else pp.copy()
        for i, (ma, buf) in new.items():
            if i == mi:
                continue
            if parity is None:
                parity = buf.copy()
            else:
                xor_into(parity[ma - w0:ma - w0 + len(buf)], buf)
        if plan.log and arr.journal:
            await arr.make_durable(s, {roles[i] for i in range(geom.data_chunks)
                                       if roles[i] != m and _minus(plan.window, plan.modified_blocks(i))})
            ticket = await _log(arr, plan, pp, new, mi, roles, pieces, old)
        writes.append((p, w0, parity))
    try:
        await write_extents(arr, s, writes, fua)
        if fua and ticket is not None:
            await arr.ppl_mark_durable(p, ticket)
    finally:
        if ticket is not None:
            await arr.seq_done(p, ticket)


def _new_blocks(plan: WritePlan, roles: list[int], pieces: dict[int, tuple[int, memoryview]],
                old) -> dict[int, tuple[int, np.ndarray]]:
    """data index -> (chunk offset, block-aligned new contents) of each modified chunk."""
    new: dict[int, tuple[int, np.ndarray]] = {}
    for i, (lo, data) in pieces.items():
        ma, mb = plan.modified_blocks(i)
        edges = _edges(lo, lo + len(data))
        if plan.mode is not WriteMode.READ_MODIFY_WRITE and not edges:
            new[i] = (ma, np.frombuffer(data, dtype=np.uint8))     # no copy
            continue
        if plan.mode is WriteMode.READ_MODIFY_WRITE:
            buf = old(roles[i], ma, mb).copy()
        else:
            buf = np.empty(mb - ma, dtype=np.uint8)
            for ea, eb in edges:
                buf[ea - ma:eb - ma] = old(roles[i], ea, eb)
        buf[lo - ma:lo - ma + len(data)] = np.frombuffer(data, dtype=np.uint8)
        new[i] = (ma, buf)
    return new


def _partial_parity(plan: WritePlan, roles: list[int], new: dict[int, tuple[int, np.ndarray]],
                    old, mi: int | None) -> np.ndarray | None:
    """XOR over the window of the data the update leaves untouched (None: all zero).
    A missing modified chunk (mi) counts as untouched with its new contents."""
    w0, w1 = plan.window
    if plan.mode is WriteMode.READ_MODIFY_WRITE:
        pp = old(plan.parity_role, w0, w1).copy()
        for i, (ma, buf) in new.items():
            xor_into(pp[ma - w0:ma - w0 + len(buf)], old(roles[i], ma, ma + len(buf)))
    elif plan.mode is WriteMode.FULL_STRIPE:
        return None
    else:
        pp = np.zeros(w1 - w0, dtype=np.uint8)
        for i in range(len(roles)):
            for a, b in _minus(plan.window, plan.modified_blocks(i)):
                xor_into(pp[a - w0:b - w0], old(roles[i], a, b))
    if mi is not None and mi in new:
        ma, buf = new[mi]
        xor_into(pp[ma - w0:ma - w0 + len(buf)], buf)
    return pp


async def _log(arr: StripeArray, plan: WritePlan, pp: np.ndarray | None,
               new: dict[int, tuple[int, np.ndarray]], mi: int | None, roles: list[int],
               pieces: dict[int, tuple[int, memoryview]], old) -> int:
    """Write the update's partial-parity record (FUA) to the parity member's ring."""
    w0, w1 = plan.window
    rows = tuple((new[i][0] // BLOCK, (new[i][0] + len(new[i][1])) // BLOCK)
                 if i in new and i != mi else (0, 0) for i in range(arr.geom.data_chunks))
    edges = [(i, ea // BLOCK) for i, (lo, data) in sorted(pieces.items()) if i != mi
             for ea, _ in _edges(lo, lo + len(data))]
    full = pp is None
    payload = b"".join([b"" if full else pp.tobytes()] + [
        old(roles[i], row * BLOCK, (row + 1) * BLOCK).tobytes() for i, row in edges])
    p = plan.parity_role
    record = PPLRecord(arr.uuid, arr.ppl_generation(p), arr.next_seq(), plan.stripe,
                       w0 // BLOCK, (w1 - w0) // BLOCK, rows, full, zlib.crc32(payload),
                       tuple(edges))
    try:
        return await arr.ppl_append(p, record, payload)
    except BaseException:
        await arr.seq_done(p, record.seq)
        raise


async def write_extents(arr: StripeArray, stripe: int, writes: list[tuple[int, int, np.ndarray]],
                        fua: bool) -> None:
    """Write chunk extents to their members at once, then record their checksums
    (durably with FUA). Every surviving member's checksums are recorded, even
    when another member is lost while recording its own (its checksum block
    may have to be read first): the caller plans the update again without the
    lost member and reads the others back verified. Raises MemberLost after
    marking failed members faulty."""
    base = arr.geom.chunk_offset(stripe)
    results = await asyncio.gather(
        *(arr.write_member(role, base + at, buf.data, fua) for role, at, buf in writes),
        return_exceptions=True)
    lost = await arr.settle([role for role, _, _ in writes], results)
    for (role, at, buf), res in zip(writes, results):
        if res is None and role not in lost:
            c = arr.geom.chunk_size
            for covered in range(stripe + at // c, stripe + (at + len(buf) - 1) // c + 1):
                arr.note_written(covered, role)
            try:
                changed = await arr.csums[role].update(block_no(arr, stripe, at),
                                                       block_tags(buf.data))
                if fua:
                    await arr.csums[role].write_back(changed, fua=True)
            except MemberLost:
                lost.append(role)       # marked faulty by mread/mwrite; go on with the others
    if lost:
        raise MemberLost(lost[0])


async def write_full_stripes(arr: StripeArray, first: int, data: memoryview, fua: bool) -> None:
    """Write whole stripes from `first` with one write per member (all present,
    no live log record to supersede: a full-stripe write needs no log)."""
    geom = arr.geom
    count = len(data) // geom.stripe_data_size
    words = geom.chunk_size // 8
    chunks = np.frombuffer(data, dtype=np.uint64).reshape(count, geom.data_chunks, words)
    parity = chunks[:, 0].copy()
    for i in range(1, geom.data_chunks):
        np.bitwise_xor(parity, chunks[:, i], out=parity)
    rows = np.arange(count)
    writes = []
    for role, layout in enumerate(run_layout(geom, first, count)):
        index = np.array(layout)
        buf = chunks[rows, np.maximum(index, 0)]
        buf[index < 0] = parity[index < 0]
        writes.append((role, 0, buf.reshape(-1).view(np.uint8)))
    await write_extents(arr, first, writes, fua)


async def read_full_stripes(arr: StripeArray, first: int, count: int, out: memoryview) -> bool:
    """Read whole stripes from `first` into `out`, one read per member. False
    when a member fails or a block fails its checksum (the caller then reads
    stripe by stripe, which repairs)."""
    geom = arr.geom
    roles = range(geom.members)
    try:
        runs = await asyncio.gather(*(arr.mread(r, geom.chunk_offset(first), count * geom.chunk_size)
                                      for r in roles))
    except MemberLost:
        return False
    dest = np.frombuffer(out, dtype=np.uint8).reshape(count, geom.data_chunks, geom.chunk_size)
    bpc = geom.blocks_per_chunk
    for role, layout in zip(roles, run_layout(geom, first, count)):
        stored = await arr.csums[role].get(block_no(arr, first, 0), count * bpc)
        run = np.frombuffer(runs[role], dtype=np.uint8).reshape(count, geom.chunk_size)
        for j, index in enumerate(layout):
            if index < 0:
                continue
            view = memoryview(runs[role])[j * geom.chunk_size:(j + 1) * geom.chunk_size]
            for k, tag in enumerate(block_tags(view)):
                if stored[j * bpc + k] not in (0, tag):
                    return False
            dest[j, index] = run[j]
    return True
