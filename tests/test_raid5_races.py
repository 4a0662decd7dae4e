"""Data-path races of the RAID5 engine (issue 9, section 2), each driven as one
exact interleaving on in-memory members with volatile caches: the test holds
member flushes (`PacedMember`) or cancels a write at a chosen point, then cuts
the power, loses a member and reads back what was durable before."""

import asyncio
import errno
import os

import pytest

from opie.raid5 import checksums
from opie.raid5.assemble import assemble, create
from opie.raid5.bitmap import BitmapRecord
from opie.raid5.geometry import BITMAP_OFFSET, BLOCK, CSUMS_PER_BLOCK
from opie.raid5.member import MemoryMember
from opie.raid5.shield import run_to_end
from opie.raid5.testing import FaultyMember, PacedMember

CHUNK = 16384
PPL = 256 << 10
STRIPES = 6
WAIT = 5.0          # seconds: bound of every wait on the array


def run(coro):
    return asyncio.run(coro)


async def paced_array(members: int = 3):
    """A clean array over volatile paced members, filled with random bytes and
    flushed twice (data and its clean bitmap stable)."""
    mems = [MemoryMember(8 << 20, f"disk{i}", volatile=True) for i in range(members)]
    paced = [PacedMember(m) for m in mems]
    arr = await create(paced, chunk_size=CHUNK, ppl_size=PPL, region_stripes=1,
                       assume_clean=True)
    ref = bytearray(os.urandom(STRIPES * arr.geom.stripe_data_size))
    await arr.write(0, bytes(ref))
    await arr.flush()
    await arr.flush()
    return mems, paced, arr, ref


def chunk_at(arr, stripe: int, index: int) -> int:
    """Array offset of data chunk `index` of `stripe`."""
    return stripe * arr.geom.stripe_data_size + index * arr.geom.chunk_size


class HeldDisk:
    """The member area a ChecksumTable reads and writes, in memory. A write
    (every write, or with `hold_fua=False` only a plain one) sets `writing` and
    waits for `hold`; it then fails with EIO while `broken`. `stable` keeps
    what FUA writes made durable."""

    def __init__(self, hold_fua: bool = True) -> None:
        self.data = bytearray(4 * BLOCK)
        self.stable = bytearray(4 * BLOCK)
        self.hold = asyncio.Event()
        self.writing = asyncio.Event()
        self.broken = False
        self.hold_fua = hold_fua

    async def read(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(0)
        return bytes(self.data[offset:offset + length])

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        if self.hold_fua or not fua:
            self.writing.set()
            await self.hold.wait()
            if self.broken:
                raise OSError(errno.EIO, "disk0: I/O error")
        self.data[offset:offset + len(data)] = data
        if fua:
            self.stable[offset:offset + len(data)] = data

    def table(self) -> checksums.ChecksumTable:
        return checksums.ChecksumTable("disk0", 0, self.read, self.write)


def entry(area: bytearray, block: int) -> int:
    """The stored tag of member block `block` (< CSUMS_PER_BLOCK) in `area`."""
    return checksums.ChecksumBlock.from_bytes(bytes(area[:BLOCK]), 0).entries[block]


def test_flush_keeps_the_bit_of_a_write_that_completed_after_it_sent_its_flushes():
    """2.1: flush F1 sends its member flushes; write W (region 0) completes;
    flush F2 starts; F1 returns. W is not durable (F2 has not reached the
    disks), so region 0 must stay dirty. A write elsewhere then writes the
    bitmap with FUA, the power fails before F2's flushes land with W's data
    but not its parity on disk, and the other data member of stripe 0 is lost:
    its chunk, durable long before, must read back unchanged."""
    async def go():
        mems, paced, arr, ref = await paced_array()
        g = arr.geom
        d, o, p = g.data_role(0, 0), g.data_role(0, 1), g.parity_role(0)
        for m in paced:
            m.hold = True
        f1 = asyncio.create_task(arr.flush())
        first = [await m.next_flush() for m in paced]
        for call in first:
            call.effect.set()                          # F1 reaches the disks before W
        await asyncio.wait_for(arr.write(chunk_at(arr, 0, 0), os.urandom(BLOCK)), WAIT)
        f2 = asyncio.create_task(arr.flush())
        second = [await m.next_flush() for m in paced]  # held: F2 never reaches the disks
        for call in first:
            call.reply.set()
        await asyncio.wait_for(f1, WAIT)
        bit_kept = 0 in arr.dirty_regions
        # a first write to another region writes the bitmap (as it is now) with FUA
        await asyncio.wait_for(arr.write(chunk_at(arr, 1, 0), os.urandom(BLOCK)), WAIT)
        f2.cancel()                                     # the power fails
        await asyncio.gather(f2, return_exceptions=True)
        assert len(second) == len(paced)
        mems[d].power_loss(keep=1.0)                    # W's data reached the disk ...
        mems[p].power_loss(keep=0.0)                    # ... its parity did not
        mems[o].power_loss(keep=0.0)
        for m in paced:
            m.hold = False
        again = await asyncio.wait_for(assemble([paced[d], paced[p]]), WAIT)   # o is lost
        lo = chunk_at(again, 0, 1)
        assert await again.read(lo, CHUNK) == ref[lo:lo + CHUNK]
        assert bit_kept
    run(go())


def test_a_cancelled_stripe_update_is_finished_before_its_log_record_retires():
    """2.2: a write to stripe 0 has logged its partial parity and written its
    data chunk; its parity write is still on the way when the write is
    cancelled (a closing NBD session does that). The head then flushes, as
    before it marks the array clean, and the power fails. With the other data
    member of stripe 0 lost, that member's chunk, durable long before, must
    read back unchanged, and the written block must hold old or new bytes."""
    async def go():
        mems, paced, arr, ref = await paced_array()
        g = arr.geom
        d, p = g.data_role(0, 0), g.parity_role(0)
        base = g.chunk_offset(0)
        paced[p].hold_write = lambda offset, length: base <= offset < base + CHUNK
        new = os.urandom(BLOCK)
        at = chunk_at(arr, 0, 0)
        write = asyncio.create_task(arr.write(at, new))
        parity = await paced[p].next_write()
        assert await mems[d].read(base, BLOCK) == new      # data written, parity held
        write.cancel()
        parity.release()
        done, _ = await asyncio.wait([write], timeout=WAIT)
        assert done and write.cancelled()
        paced[p].hold_write = None
        await asyncio.wait_for(arr.flush(), WAIT)
        for m in mems:
            m.power_loss(keep=0.0)
        again = await asyncio.wait_for(assemble([paced[d], paced[p]]), WAIT)   # o is lost
        lo = chunk_at(again, 0, 1)
        assert await again.read(lo, CHUNK) == ref[lo:lo + CHUNK]
        assert await again.read(at, BLOCK) in (new, ref[at:at + BLOCK])
    run(go())


def test_run_to_end_finishes_the_update_then_raises_the_cancellation():
    """The contract 2.2's fix rests on: a cancelled caller waits for its update
    and is cancelled after it; uncancelled, the update's own error surfaces."""
    async def go():
        begun, gate, steps = asyncio.Event(), asyncio.Event(), []

        async def update():
            steps.append("begun")
            begun.set()
            await gate.wait()
            steps.append("ended")

        caller = asyncio.create_task(run_to_end(update()))
        await asyncio.wait_for(begun.wait(), WAIT)
        caller.cancel()
        await asyncio.sleep(0)                         # one loop step: the cancel is delivered
        assert not caller.done()                       # ... and the caller still waits
        gate.set()
        done, _ = await asyncio.wait([caller], timeout=WAIT)
        assert done and caller.cancelled() and steps == ["begun", "ended"]

        async def broken():
            raise OSError(5, "member gone")
        with pytest.raises(OSError):
            await run_to_end(broken())
    run(go())


def test_a_checksum_block_evicted_while_its_write_back_is_in_flight_is_not_reloaded_stale(monkeypatch):
    """Found by the concurrent property test: write_back marks a block clean
    before its write lands; a load of another block may evict it in that gap,
    and a reload read the old block from disk, so the new checksums were lost
    (scrub then named a good block bad)."""
    from opie.raid5 import checksums
    from opie.raid5.geometry import CSUMS_PER_BLOCK
    monkeypatch.setattr(checksums, "MAX_CACHED", 1)

    async def go():
        disk = HeldDisk()
        table = disk.table()
        await table.update(5, [1234])
        back = asyncio.ensure_future(table.write_back())
        await asyncio.wait_for(disk.writing.wait(), 5)     # the new block is on its way, not on disk
        assert await table.get(CSUMS_PER_BLOCK, 1) == [0]  # another block: evicts the first
        reread = asyncio.ensure_future(table.get(5, 1))
        await asyncio.sleep(0.01)
        disk.hold.set()
        await asyncio.wait_for(back, 5)
        assert await asyncio.wait_for(reread, 5) == [1234]
        assert entry(disk.data, 5) == 1234

    asyncio.run(go())


@pytest.mark.parametrize("ending", ["cancelled", "failed"])
def test_a_checksum_block_evicted_while_its_write_back_is_in_flight_survives_a_failed_write_back(
        monkeypatch, ending):
    """Found by the concurrent property test (a FUA write cancelled while a
    flush wrote its checksum block back): the block is clean while its write
    back is in flight, so a load of another block evicted it; when the write
    back then ended without landing, the block was marked dirty again but its
    entries were gone, and a reload read the old block from disk (scrub named
    the new data bad)."""
    monkeypatch.setattr(checksums, "MAX_CACHED", 1)

    async def go():
        disk = HeldDisk()
        disk.broken = True
        table = disk.table()
        await table.update(5, [1234])
        back = asyncio.ensure_future(table.write_back())
        await asyncio.wait_for(disk.writing.wait(), 5)     # on its way, not on disk
        assert await table.get(CSUMS_PER_BLOCK, 1) == [0]  # another block: evicts the first
        if ending == "cancelled":
            back.cancel()
            with pytest.raises(asyncio.CancelledError):
                await back
        else:
            disk.hold.set()
            with pytest.raises(OSError):
                await back
        assert await table.get(5, 1) == [1234]
        disk.broken = False
        disk.hold.set()
        await table.write_back()
        assert entry(disk.data, 5) == 1234

    asyncio.run(go())


def test_a_write_during_the_bitmap_write_that_clears_its_region_sets_the_bit_again():
    """Found by the concurrent property test (failure 1: after a power cut two
    members of a row had new checksums over old data): a flush clears region
    0's bit and its bitmap write is in flight; a write to region 0 starts.
    The bit still counted as durably set, so the write went ahead with its
    bit neither on disk nor in memory, and a crash skipped its resync."""
    async def go():
        mems, paced, arr, ref = await paced_array()
        await asyncio.wait_for(arr.write(chunk_at(arr, 0, 0), os.urandom(BLOCK)), WAIT)
        assert 0 in arr.dirty_regions
        for m in paced:
            m.hold_write = lambda offset, length: offset == BITMAP_OFFSET
        flush = asyncio.create_task(arr.flush())
        clearing = [await m.next_write() for m in paced]    # the bitmap without region 0
        write = asyncio.create_task(arr.write(chunk_at(arr, 0, 0), os.urandom(BLOCK)))
        for _ in range(50):
            await asyncio.sleep(0)
        for m in paced:
            m.hold_write = None
        for call in clearing:
            call.release()
        await asyncio.wait_for(asyncio.gather(flush, write), WAIT)
        assert 0 in arr.dirty_regions
        for m in mems:
            on_disk = BitmapRecord.from_bytes(bytes(m.data[BITMAP_OFFSET:BITMAP_OFFSET + BLOCK]))
            assert 0 in on_disk.dirty_regions(), m.name
    run(go())


@pytest.mark.parametrize("flush_ends", ["cancelled", "landed"])
def test_a_fua_write_back_of_a_block_a_plain_write_back_is_writing_makes_it_durable(flush_ends):
    """A FUA write's checksums go to a block that a flush's write back (not
    FUA) took and is still writing: the FUA write back found nothing dirty and
    returned at once, so the write was acknowledged with its checksums in no
    member's stable storage (the flush, cancelled or not yet at its member
    flushes, had not made them so)."""
    async def go():
        disk = HeldDisk(hold_fua=False)
        table = disk.table()
        changed = await table.update(5, [1234])
        flush = asyncio.ensure_future(table.write_back())
        await asyncio.wait_for(disk.writing.wait(), 5)
        fua = asyncio.ensure_future(table.write_back(changed, fua=True))
        for _ in range(10):
            await asyncio.sleep(0)
        if flush_ends == "cancelled":
            flush.cancel()
        else:
            disk.hold.set()
        await asyncio.gather(flush, return_exceptions=True)
        await asyncio.wait_for(fua, 5)
        assert entry(disk.stable, 5) == 1234


def test_a_member_lost_between_its_write_and_its_checksum_update_leaves_the_others_checksums_right():
    """Found by the concurrent property test: a stripe update's member writes
    all land, then one member dies before its checksums are recorded (its
    checksum block is not cached, so recording it reads the dead member). The
    other members' checksums must still be recorded: the update is planned
    again without the dead member and reads them back verified."""
    async def go():
        mems = [MemoryMember(8 << 20, f"disk{i}", volatile=True) for i in range(3)]
        paced = [PacedMember(m) for m in mems]
        disks = [FaultyMember(p) for p in paced]       # the failure gate sits above the hold
        arr = await create(disks, chunk_size=CHUNK, ppl_size=PPL, region_stripes=1,
                           assume_clean=True)
        await arr.write(0, os.urandom(arr.geom.stripe_data_size))
        await arr.stop()
        arr = await asyncio.wait_for(assemble(disks), WAIT)   # nothing cached yet
        assert arr.geom.data_role(0, 0) == 0 and arr.geom.parity_role(0) == 2
        paced[0].hold_write = lambda offset, length: offset >= arr.geom.data_offset
        new = os.urandom(arr.geom.stripe_data_size)
        write = asyncio.create_task(arr.write(0, new, fua=True))    # one whole stripe
        held = await paced[0].next_write()
        disks[0].failed = True          # disk0 takes the write, then its ISU dies
        held.release()
        await asyncio.wait_for(write, WAIT)
        assert arr.state_string() == "_UU"
        assert await asyncio.wait_for(arr.read(0, len(new)), WAIT) == new

    run(go())
