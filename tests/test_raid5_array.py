"""Array behaviour: assembly rules, degraded mode, second failure, FUA and
flush reaching the members, and the state shown to humans."""

import asyncio
import errno
import os
import random

import pytest

from opie.raid5.assemble import assemble, create
from opie.raid5.errors import ArrayFailed, AssemblyError
from opie.raid5.member import FileMember, Member, MemoryMember
from opie.raid5.testing import rig

CHUNK = 16384


def run(coro):
    return asyncio.run(coro)


async def fresh(n=4, **kw):
    r = rig(n, stripes=kw.pop("stripes", 12), chunk_size=CHUNK, volatile=kw.pop("volatile", False))
    return r, await r.create(**kw)


def test_members_conform_to_protocol(tmp_path):
    assert isinstance(MemoryMember(4096), Member)
    f = FileMember(str(tmp_path / "m"), size=8192)
    assert isinstance(f, Member)

    async def io():
        await f.write(4096, b"x" * 4096, fua=True)
        await f.flush()
        assert await f.read(4096, 4096) == b"x" * 4096
    run(io())
    f.close()


def test_file_members_round_trip(tmp_path):
    async def go():
        size = 3 << 20
        ms = [FileMember(str(tmp_path / f"d{i}.img"), size=size) for i in range(3)]
        arr = await create(ms, chunk_size=CHUNK, ppl_size=256 << 10, assume_clean=True)
        data = os.urandom(arr.size)
        await arr.write(0, data)
        await arr.stop()
        again = [FileMember(str(tmp_path / f"d{i}.img")) for i in (2, 0, 1)]
        arr2 = await assemble(again)
        assert await arr2.read(0, arr2.size) == data
    run(go())


def test_assemble_any_order_and_clean_stop():
    async def go():
        r, arr = await fresh()
        data = os.urandom(arr.size)
        await arr.write(0, data)
        await arr.stop()
        members = list(r.disks)
        random.Random(3).shuffle(members)
        arr2 = await assemble(members)
        assert arr2.state_string() == "UUUU"
        assert arr2.dirty_regions == set()
        assert await arr2.read(0, arr2.size) == data
    run(go())


def test_refusals_are_clear():
    async def go():
        r, arr = await fresh()
        await arr.stop()
        other, arr_other = await fresh()
        await arr_other.stop()
        with pytest.raises(AssemblyError, match="disk1: foreign member of array"):
            await assemble([r.disks[0], r.disks[2], r.disks[3], other.disks[1]])
        with pytest.raises(AssemblyError, match="refusing to assemble: role1, role2 missing"):
            await assemble([r.disks[0], r.disks[3]])
        with pytest.raises(AssemblyError, match="not an Opie RAID5 member"):
            await assemble([MemoryMember(1 << 20, "blank")] + r.disks[1:])
        with pytest.raises(AssemblyError, match="role 2 given twice"):
            await assemble([r.disks[2], r.disks[2], r.disks[0]])
        # one missing: starts degraded, and the missing one is then stale
        arr2 = await assemble([r.disks[0], r.disks[1], r.disks[3]])
        assert arr2.state_string() == "UU_U"
        await arr2.write(0, b"z" * 100)
        await arr2.stop()
        with pytest.raises(AssemblyError, match=r"disk2: stale: failed at events \d+, array at \d+"):
            await assemble(r.disks)
    run(go())


def test_degraded_reads_and_writes_then_second_failure_stops_writes():
    async def go():
        r, arr = await fresh(5)
        ref = bytearray(os.urandom(arr.size))
        await arr.write(0, bytes(ref))
        r.disks[3].failed = True                       # discovered by the next I/O
        assert await arr.read(0, arr.size) == bytes(ref)
        assert arr.state_string() == "UUU_U"
        rng = random.Random(1)
        for _ in range(40):
            at = rng.randrange(arr.size - 9000)
            d = os.urandom(rng.randrange(1, 9000))
            await arr.write(at, d, fua=rng.random() < 0.5)
            ref[at:at + len(d)] = d
        assert await arr.read(0, arr.size) == bytes(ref)
        r.disks[0].failed = True
        with pytest.raises(ArrayFailed) as info:
            await arr.write(0, os.urandom(3 * CHUNK))
        assert info.value.errno == errno.EIO
        assert "disk0 failed while disk3 was already out of sync; writes stopped" in str(info.value)
        with pytest.raises(ArrayFailed):
            await arr.write(arr.size - 10, b"0123456789")
        assert arr.status()["failed"]
        assert arr.state_string() == "_UU_U"
        # the surviving members were not written with half-known stripes
        with pytest.raises(OSError):
            await arr.read(0, arr.size)
    run(go())


@pytest.mark.parametrize("how", ["fua", "flush", "none"])
def test_fua_and_flush_reach_every_member(how):
    async def go():
        r, arr = await fresh(4, volatile=True)
        await arr.flush()
        data = os.urandom(arr.size)
        await arr.write(0, data, fua=(how == "fua"))
        if how == "flush":
            await arr.flush()
        r.power_loss(keep=0.0)                    # every unflushed write is lost
        arr2 = await assemble(r.disks[1:])        # and a member with it
        got = await arr2.read(0, arr2.size)
        if how == "none":
            assert got != data
        else:
            assert got == data
    run(go())


def test_status_for_humans():
    async def go():
        r, arr = await fresh(4)
        s = arr.status()
        assert s["state"] == "UUUU" and s["size"] == arr.size and s["failed"] is None
        assert [m["name"] for m in s["members"]] == ["disk0", "disk1", "disk2", "disk3"]
        await arr.fail(1)
        assert arr.status()["members"][1]["state"] == "faulty"
        assert arr.state_string() == "U_UU"
    run(go())


def test_out_of_range_io_refused():
    async def go():
        r, arr = await fresh(3)
        with pytest.raises(OSError) as info:
            await arr.write(arr.size - 1, b"ab")
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            await arr.read(-1, 2)
    run(go())


def test_overlapping_writes_to_one_stripe_are_serialized():
    async def go():
        r, arr = await fresh(4)
        writes = [(i * 1000, bytes([i]) * 5000) for i in range(20)]
        await asyncio.gather(*(arr.write(at, d) for at, d in writes))
        got = await arr.read(0, 30000)
        # every byte is from one of the writes covering it, and parity agrees (scrub)
        for pos in range(0, 24000, 997):
            covering = [i for i, (at, d) in enumerate(writes) if at <= pos < at + len(d)]
            assert got[pos] in covering
        from opie.raid5.scrub import scrub
        rep = await scrub(arr)
        assert (rep.mismatches, rep.repaired, rep.unrecoverable) == (0, 0, 0)
    run(go())


def test_usable_size_follows_smallest_member():
    async def go():
        sizes = [40 << 20, 12 << 20, 64 << 20]
        arr = await create([MemoryMember(s, f"m{i}") for i, s in enumerate(sizes)],
                           chunk_size=65536, ppl_size=1 << 20, assume_clean=True)
        same = await create([MemoryMember(12 << 20, f"n{i}") for i in range(3)],
                            chunk_size=65536, ppl_size=1 << 20, assume_clean=True)
        assert arr.size == same.size == arr.geom.stripes * 2 * 65536
        assert arr.geom.data_offset + arr.geom.stripes * 65536 <= 12 << 20
    run(go())


def test_checksum_cache_is_bounded(monkeypatch):
    import opie.raid5.checksums
    monkeypatch.setattr(opie.raid5.checksums, "MAX_CACHED", 1)

    async def go():
        r = rig(4, stripes=600, chunk_size=CHUNK)
        arr = await r.create()
        ref = await r.fill()
        assert arr.geom.csum_blocks == 3
        assert await arr.read(0, arr.size) == ref
        assert len(arr.csums[0]._blocks) == 1          # clean blocks were dropped and reloaded
        from opie.raid5.scrub import scrub
        rep = await scrub(arr)
        assert (rep.repaired, rep.mismatches, rep.unrecoverable) == (0, 0, 0)
    run(go())


def test_checksum_update_across_two_blocks_survives_eviction(monkeypatch):
    """Issue 9, 2.6: loading the second checksum block of an update must not
    evict the first one, already updated in the cache but not yet written."""
    import opie.raid5.checksums
    from opie.raid5.checksums import ChecksumTable
    from opie.raid5.geometry import BLOCK, CSUMS_PER_BLOCK
    monkeypatch.setattr(opie.raid5.checksums, "MAX_CACHED", 1)

    async def go():
        disk = MemoryMember(4 * BLOCK, "csums")
        table = ChecksumTable("csums", 0, disk.read, disk.write)
        first = CSUMS_PER_BLOCK - 1                    # last entry of block 0, first of block 1
        assert await table.update(first, [11, 22]) == {0, 1}
        assert await table.get(first, 2) == [11, 22]
        await table.write_back()
        again = ChecksumTable("csums", 0, disk.read, disk.write)
        assert await again.get(first, 2) == [11, 22]
    run(go())
