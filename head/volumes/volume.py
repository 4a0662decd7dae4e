"""Volumes and snapshots as block devices: the data path.

A write is planned per segment, then performed: a segment the volume owns
alone is overwritten in place (no metadata, unless it fills blocks a partial
version lacked); a segment never written, or one a snapshot shares, gets a
new segment holding only the blocks written (a partial version, see
`mapping`): the rest reads as zeros or through to the shared version, so
copy-on-write copies nothing but the unwritten part of the edge blocks. New
segments are reserved for the whole write before any I/O, so a write that
cannot be placed raises OSError(ENOSPC) and changes nothing. The mapping is
updated only after the data write returned, so a commit never points at data
that is not on the device.

Durability: a write with fua=True, or one followed by a returned `flush()`,
survives a crash together with the mapping that points at it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from opie.head.volumes.core import PoolCore
from opie.head.volumes.devices import check_range
from opie.head.volumes.mapping import Chain, block_mask
from opie.head.volumes.model import SnapshotState, VolumeState

log = logging.getLogger(__name__)

# (logical segment, offset in segment, offset in the request, length)
Piece = tuple[int, int, int, int]


def split(offset: int, length: int, segment_size: int) -> list[Piece]:
    pieces = []
    done = 0
    while done < length:
        logical, at = divmod(offset + done, segment_size)
        n = min(segment_size - at, length - done)
        pieces.append((logical, at, done, n))
        done += n
    return pieces


def _runs(chain: Chain, first: int, last: int) -> list[tuple[int, int, int | None]]:
    """Blocks first..last-1 as runs (start, end, physical segment or None for
    zeros), each block from the top version in `chain` that holds it."""
    want = block_mask(first, last)
    if chain and chain[0][1] & want == want:
        return [(first, last, chain[0][0])]
    takes = []
    for phys, bits in chain:
        if want & bits:
            takes.append((want & bits, phys))
        want &= ~bits
        if not want:
            break
    runs: list[tuple[int, int, int | None]] = []
    for b in range(first, last):
        src = next((phys for take, phys in takes if take >> b & 1), None)
        if runs and runs[-1][2] == src:
            runs[-1] = (runs[-1][0], b + 1, src)
        else:
            runs.append((b, b + 1, src))
    return runs


async def read_chain(core: PoolCore, chain: Chain, lo: int, hi: int) -> bytes:
    """Bytes lo..hi-1 of a segment as `chain` resolves them."""
    if not chain:
        return bytes(hi - lo)
    sub = core.geometry.block_size
    parts = []
    for first, last, phys in _runs(chain, lo // sub, -(-hi // sub)):
        start, end = max(lo, first * sub), min(hi, last * sub)
        if phys is None:
            parts.append(bytes(end - start))
        else:
            parts.append(await core.device.read(core.geometry.segment_offset(phys) + start, end - start))
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_view(core: PoolCore, vid: int, epoch: int | None, offset: int, length: int) -> bytes:
    """Bytes of a volume (epoch None) or of its snapshot at `epoch`; holes read
    as zeros. The caller holds the segment locks (see VolumeDevice.read)."""
    seg = core.segment_size
    pieces = split(offset, length, seg)
    if len(pieces) == 1:  # the common case: no assembly buffer
        logical, at, _, n = pieces[0]
        return await read_chain(core, core.table.chain(vid, logical, epoch), at, at + n)
    out = bytearray(length)
    for logical, at, done, n in pieces:
        chain = core.table.chain(vid, logical, epoch)
        if chain:
            out[done:done + n] = await read_chain(core, chain, at, at + n)
    return bytes(out)


async def _edges(core: PoolCore, source: Callable[[], Chain], bits: int, at: int,
                 piece: bytes) -> tuple[int, bytes]:
    """(offset, buffer) to write so that every block `piece` at `at` touches is
    whole: the parts of edge blocks the piece misses come from the chain
    `source()` gives, unless `bits` says the target already holds that block."""
    sub = core.geometry.block_size
    end = at + len(piece)
    lo, hi = at - at % sub, -(-end // sub) * sub
    need_head = lo < at and not bits >> (lo // sub) & 1
    need_tail = end < hi and not bits >> (hi // sub - 1) & 1
    if not need_head and not need_tail:
        return at, piece
    chain = source()
    head = await read_chain(core, chain, lo, at) if need_head else b""
    tail = await read_chain(core, chain, end, hi) if need_tail else b""
    return at - len(head), b"".join((head, piece, tail))


async def write_locked(core: PoolCore, vs: VolumeState, offset: int, data: bytes, fua: bool) -> None:
    """The write path; the caller holds the volume's write gate."""
    seg = core.segment_size
    table = core.table
    pieces = split(offset, len(data), seg)
    async with vs.locks.hold(p[0] for p in pieces):
        plan = []
        fresh_needed = 0
        for logical, at, done, n in pieces:
            phys = table.visible(vs.id, logical)
            in_place = phys is not None and not table.shared(vs.id, phys)
            fresh_needed += not in_place
            plan.append((logical, at, done, n, phys, in_place))
        fresh = await core.reserve(fresh_needed)
        placed: list[tuple[int, int, int, bool]] = []   # logical, new, bits, read-through
        filled: list[tuple[int, int]] = []               # partial version, bits it gains
        # a FUA piece whose segment's mapping is not yet durable needs a commit
        needs_commit = fua and fresh_needed > 0
        sub = core.geometry.block_size
        try:
            for logical, at, done, n, phys, in_place in plan:
                piece = data[done:done + n]
                touched = block_mask(at // sub, -(-(at + n) // sub))
                if in_place and phys is not None:
                    bits = table.bits(phys)
                    if bits & touched == touched:
                        unsettled = phys in core.unsettled
                        needs_commit |= fua and unsettled
                        await core.device.write(core.geometry.segment_offset(phys) + at, piece,
                                              fua=fua and not unsettled)
                        continue
                    start, buf = await _edges(core, lambda: table.chain_from(
                        vs.id, logical, table.below(vs.id, logical, phys)), bits, at, piece)
                    await core.device.write(core.geometry.segment_offset(phys) + start, buf)
                    filled.append((phys, touched))
                    needs_commit |= fua
                    continue
                new = fresh[len(placed)]
                start, buf = await _edges(core, lambda: table.chain_from(vs.id, logical, phys),
                                          0, at, piece)
                await core.device.write(core.geometry.segment_offset(new) + start, buf)
                placed.append((logical, new, touched, phys is not None))
        except BaseException:
            core.alloc.give_back(fresh)
            raise
        for logical, new, bits, backed in placed:
            core.alloc.defer(table.place(vs.id, logical, new, bits, backed))
            core.unsettled.add(new)
        for phys, bits in filled:
            if table.fill(phys, bits):
                core.unsettled.add(phys)
    if needs_commit:
        await core.commit()


class VolumeDevice:
    """A thin volume as a block device (`size`, `read`, `write`, `flush`,
    `trim`, `write_zeroes`, `cache`), shaped to serve as an NBD export as is
    (the attributes of `nbd.export.Export`). Any number may be open on one
    volume; all go through the same locks, and a flush on one covers writes
    done through all (so multi-conn is safe). I/O on a deleted volume raises
    OSError(ENODEV)."""

    read_only = False
    can_multi_conn = True
    can_trim = True
    can_zero = True

    def __init__(self, core: PoolCore, state: VolumeState) -> None:
        self._core = core
        self._vs = state

    @property
    def name(self) -> str:
        return self._vs.name

    @property
    def description(self) -> str:
        return f"opie volume {self._vs.name}"

    @property
    def size(self) -> int:
        return self._vs.size

    def _live(self) -> VolumeState:
        if self._vs.deleted:
            raise OSError(errno.ENODEV, f"volume {self._vs.name} was deleted")
        return self._vs

    def _check(self, offset: int, length: int) -> VolumeState:
        """The volume, if it exists and [offset, offset+length) lies inside it:
        checked when a request arrives and again once it holds the gate or
        its segment locks, since a delete (ENODEV) or shrink (EINVAL) that
        held them first may have changed the answer."""
        vs = self._live()
        check_range(vs.size, offset, length)
        return vs

    async def read(self, offset: int, length: int) -> bytes:
        """Under the segment locks, so a segment cannot be trimmed, shrunk
        away or deleted and then reused while it is being read; a read sees a
        concurrent write wholly or not at all, per segment."""
        vs = self._check(offset, length)
        async with vs.locks.hold(p[0] for p in split(offset, length, self._core.segment_size)):
            self._check(offset, length)
            return await read_view(self._core, vs.id, None, offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write `data`; durable on return if `fua`. OSError(ENOSPC) when the
        pool cannot place it, with nothing written."""
        vs = self._check(offset, len(data))
        async with vs.gate.writer():
            self._check(offset, len(data))
            await write_locked(self._core, vs, offset, data, fua)

    async def flush(self) -> None:
        """Every write that returned before this call is durable on return."""
        self._live()
        await self._core.commit()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard a range: whole segments are unmapped (space comes back after
        the next commit), partial ones zeroed. The range reads as zeros."""
        vs = self._check(offset, length)
        core = self._core
        seg = core.segment_size
        async with vs.gate.writer():
            self._check(offset, length)
            pieces = split(offset, length, seg)
            # whole segments, counting a last segment the volume ends inside
            whole = [lg for lg, at, done, n in pieces
                     if n == seg or (at == 0 and offset + done + n == vs.size)]
            async with vs.locks.hold(whole):
                for logical in whole:
                    core.alloc.defer(core.table.unmap(vs.id, logical))
            for logical, at, done, n in pieces:
                if logical not in whole and core.table.visible(vs.id, logical) is not None:
                    await write_locked(core, vs, offset + done, bytes(n), False)
        if fua:
            await core.commit()

    async def write_zeroes(self, offset: int, length: int, fua: bool = False,
                           may_trim: bool = True) -> None:
        """Same as trim: unmapped space reads as zeros. With may_trim False
        (NBD's NO_HOLE) the range is still unmapped: a thin volume allocates
        on write, so a hole is the only cheap zero it has."""
        await self.trim(offset, length, fua)

    async def cache(self, offset: int, length: int) -> None:
        """Nothing to prefetch into."""
        self._check(offset, length)


class SnapshotDevice:
    """A snapshot as a read-only block device (and NBD export, named
    VOLUME@SNAPSHOT); writes raise OSError(EROFS). A read in flight when the
    snapshot is deleted completes on the old mapping (the delete waits for
    it); one that starts or is still queued for its segments then raises
    OSError(ENODEV)."""

    read_only = True
    can_multi_conn = True
    can_trim = False
    can_zero = False

    def __init__(self, core: PoolCore, volume: VolumeState, snapshot: SnapshotState) -> None:
        self._core = core
        self._vs = volume
        self._snap = snapshot

    @property
    def name(self) -> str:
        return f"{self._vs.name}@{self._snap.name}"

    @property
    def description(self) -> str:
        return f"opie snapshot {self.name} (read-only)"

    @property
    def size(self) -> int:
        return self._snap.size

    def _live(self) -> SnapshotState:
        if self._snap.deleted:
            raise OSError(errno.ENODEV, f"snapshot {self.name} was deleted")
        return self._snap

    async def read(self, offset: int, length: int) -> bytes:
        """Under the volume's segment locks: deleting a snapshot frees versions
        this one may read (or read through to) only under them (see
        Pool.delete_snapshot). `deleted` is checked again once the locks are
        held, since a delete may have gone first and dropped this epoch."""
        check_range(self._live().size, offset, length)
        async with self._vs.locks.hold(p[0] for p in split(offset, length,
                                                           self._core.segment_size)):
            snap = self._live()
            return await read_view(self._core, self._vs.id, snap.epoch, offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        raise OSError(errno.EROFS, f"snapshot {self.name} is read-only")

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise OSError(errno.EROFS, f"snapshot {self.name} is read-only")

    async def write_zeroes(self, offset: int, length: int, fua: bool = False,
                           may_trim: bool = True) -> None:
        raise OSError(errno.EROFS, f"snapshot {self.name} is read-only")

    async def flush(self) -> None:
        return None

    async def cache(self, offset: int, length: int) -> None:
        check_range(self._snap.size, offset, length)
