"""Sub-segment copy-on-write (format version 2): partial versions.

The first write after a snapshot places a version holding only the blocks
written; the rest reads through to the version the snapshot keeps. These
tests check what that must not break: snapshots never change, backups'
changed/allocated maps cover every difference, deleting a snapshot merges
and returns space, a reopen reads the same, and a version-1 pool is refused.
"""

from __future__ import annotations

import asyncio
import errno
import random
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opie.head.volumes import MemoryDevice, Pool, UnsupportedVersion
from opie.head.volumes.records import META_BLOCK

MIB = 1 << 20


class CountingDevice(MemoryDevice):
    """Counts bytes written at or after `data_start` (set once the pool exists)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.data_start = size
        self.data_written = 0

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        if offset >= self.data_start:
            self.data_written += len(data)
        await super().write(offset, data, fua)


def test_first_write_after_a_snapshot_writes_only_its_blocks() -> None:
    async def body() -> None:
        dev = CountingDevice(64 * MIB)
        pool = await Pool.format(dev, segment_size=MIB)
        dev.data_start = pool._geo.data_start
        await pool.create_volume("v", 8 * MIB)
        vol = pool.open_volume("v")
        old = random.Random(1).randbytes(2 * MIB)
        await vol.write(0, old)
        await pool.create_snapshot("v", "s")
        dev.data_written = 0
        await vol.write(MIB - 8192, b"n" * 16384)        # 4 KiB blocks, two segments
        await vol.write(3 * MIB + 1000, b"u" * 100)      # unaligned, in a hole
        assert dev.data_written == 16384 + 4096          # no segment copied
        await vol.flush()
        want = bytearray(old + bytes(6 * MIB))
        want[MIB - 8192:MIB + 8192] = b"n" * 16384
        want[3 * MIB + 1000:3 * MIB + 1100] = b"u" * 100
        assert await vol.read(0, 8 * MIB) == want
        snap = pool.open_snapshot("v", "s")
        assert await snap.read(0, 8 * MIB) == old + bytes(6 * MIB)
        assert pool.changed_segments("v", "s") == [(0, 2 * MIB), (3 * MIB, MIB)]
        # deleting the snapshot merges the rest into the partial versions and
        # frees the old ones
        free = pool.space().free_bytes
        await pool.delete_snapshot("v", "s")
        assert pool._table.partial.keys() == {pool._table.lineages[1].live[3]}
        assert pool.space().free_bytes == free + 2 * MIB
        assert pool.check().problems == []
        await pool.close()
        again = await Pool.open(dev)
        assert await again.open_volume("v").read(0, 8 * MIB) == want
        assert again.check().problems == []
    asyncio.run(body())


def test_version_1_pool_is_refused_saying_so() -> None:
    async def body() -> None:
        dev = MemoryDevice(4 * MIB)
        pool = await Pool.format(dev, segment_size=65536)
        await pool.create_volume("v", MIB)
        await pool.close()
        image = bytes(dev.buf)
        for slot in (0, 1):          # as version 1 wrote them: same layout, version 1
            at = slot * META_BLOCK
            struct.pack_into("<H", dev.buf, at + 8, 1)
            struct.pack_into("<I", dev.buf, at + 80, zlib.crc32(dev.buf[at:at + 80]))
        with pytest.raises(UnsupportedVersion, match="expected 2, got 1 .*predates"):
            await Pool.open(dev)
        assert bytes(dev.buf[2 * META_BLOCK:]) == image[2 * META_BLOCK:]   # nothing changed
    asyncio.run(body())


class YieldingDevice(MemoryDevice):
    """Reads return to the loop first, so other tasks run in the middle."""

    async def read(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(0)
        return await super().read(offset, length)


def test_snapshot_reads_through_a_version_another_delete_frees() -> None:
    async def body() -> None:
        seg = 65536
        pool = await Pool.format(YieldingDevice(4 * MIB), segment_size=seg)
        await pool.create_volume("v", 4 * seg)
        vol = pool.open_volume("v")
        await vol.write(0, b"a" * 4 * seg)
        await pool.create_snapshot("v", "s1")
        await vol.write(0, b"b" * 512)                 # partial version over s1's
        await pool.create_snapshot("v", "s2")           # s2 reads through to s1's
        await vol.write(0, b"c" * seg)                  # live no longer shares it
        s2 = pool.open_snapshot("v", "s2")
        want = b"b" * 512 + b"a" * (seg - 512)

        async def reuse() -> None:                      # delete s1, then take its space
            await pool.delete_snapshot("v", "s1")
            await pool.create_volume("w", 8 * seg)
            await pool.open_volume("w").write(0, b"z" * 8 * seg, fua=True)

        reads = [asyncio.create_task(s2.read(0, seg)) for _ in range(3)]
        await asyncio.sleep(0)
        await asyncio.gather(reuse(), *reads)
        assert [r.result() for r in reads] == [want] * 3
        assert await s2.read(0, seg) == want
        assert pool.check().problems == []
    asyncio.run(body())


# -- property test: the pool against a model of bytes --------------------

SEG = 16384          # 32 blocks of 512 bytes
DEVICE = 256 * 1024  # 11 data segments: ENOSPC happens


class Model:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.snaps: dict[str, bytes] = {}


OPS = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2**20), st.integers(1, 2 * SEG + 700),
              st.booleans(), st.integers(0, 2**31)),
    st.tuples(st.just("write"), st.integers(0, 2**20).map(lambda x: x * 4096),
              st.integers(1, 8).map(lambda x: x * 4096), st.booleans(), st.integers(0, 2**31)),
    st.tuples(st.just("write"), st.integers(0, 2**20), st.integers(1, 2000),
              st.booleans(), st.integers(0, 2**31)),
    st.tuples(st.just("write"), st.just(0), st.just(12 * SEG), st.booleans(),
              st.integers(0, 2**31)),                       # the whole volume
    st.tuples(st.just("trim"), st.integers(0, 2**20), st.integers(1, 2 * SEG + 700)),
    st.tuples(st.just("snap")),
    st.tuples(st.just("snap")),
    st.tuples(st.just("delsnap"), st.integers(0, 7)),
    st.tuples(st.just("resize"), st.integers(1, 12).map(lambda x: x * SEG - 512)),
    st.tuples(st.just("reopen"), st.booleans()),
)


def covered(ranges: list[tuple[int, int]], size: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    for off, n in ranges:
        mask[off:off + n] = True
    return mask


async def verify(pool: Pool, model: Model) -> None:
    assert pool.check().problems == []
    size = len(model.data)
    assert await pool.open_volume("v").read(0, size) == model.data
    for name, frozen in model.snaps.items():
        assert await pool.open_snapshot("v", name).read(0, len(frozen)) == frozen, name
    # backups: allocated maps cover every non-zero byte, changed maps every difference
    views = {name: np.frombuffer(content, dtype=np.uint8) for name, content in model.snaps.items()}
    views[None] = np.frombuffer(bytes(model.data), dtype=np.uint8)
    for name, content in views.items():
        mask = covered(pool.allocated_segments("v", name), len(content))
        assert not (content.astype(bool) & ~mask).any(), name
    order = [s.name for s in pool.list_snapshots("v")]
    for i, older in enumerate(order):
        for newer in order[i + 1:] + [None]:
            old, new = views[older], views[newer]
            n = min(len(old), len(new))
            mask = covered(pool.changed_segments("v", older, newer), len(new))
            assert not ((old[:n] != new[:n]) & ~mask[:n]).any(), (older, newer)


async def run(ops: list[tuple]) -> None:
    dev = MemoryDevice(DEVICE)
    pool = await Pool.format(dev, segment_size=SEG, max_entries=31, journal_blocks=16)
    await pool.create_volume("v", 5 * SEG - 512)
    model = Model(5 * SEG - 512)
    counter = 0
    for op in ops:
        kind = op[0]
        size = len(model.data)
        vol = pool.open_volume("v")
        if kind in ("write", "trim"):
            off = op[1] % size
            n = min(op[2], size - off)
            if kind == "write":
                data = random.Random(op[4]).randbytes(n)
                try:
                    await vol.write(off, data, fua=op[3])
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                else:
                    model.data[off:off + n] = data
            else:
                try:
                    await vol.trim(off, n)
                    model.data[off:off + n] = bytes(n)
                except OSError as exc:           # zeroing a shared partial segment
                    assert exc.errno == errno.ENOSPC
                    got = await vol.read(0, size)
                    assert got[:off] == model.data[:off] and got[off + n:] == model.data[off + n:]
                    assert all(g in (m, 0) for g, m in zip(got[off:off + n], model.data[off:off + n]))
                    model.data[:] = got
        elif kind == "snap":
            if len(model.snaps) < 6:
                counter += 1
                await pool.create_snapshot("v", f"s{counter}")
                model.snaps[f"s{counter}"] = bytes(model.data)
        elif kind == "delsnap":
            names = sorted(model.snaps)
            if names:
                victim = names[op[1] % len(names)]
                await pool.delete_snapshot("v", victim)
                del model.snaps[victim]
        elif kind == "resize":
            try:
                await pool.resize_volume("v", op[1])
            except OSError as exc:               # shrinking inside a shared segment
                assert exc.errno == errno.ENOSPC
            else:
                model.data = model.data[:op[1]] + bytearray(max(0, op[1] - size))
        elif kind == "reopen":
            if op[1]:
                await pool.close()
            else:
                await vol.flush()
            pool = await Pool.open(dev)
        await verify(pool, model)
    # every snapshot gone: only live versions remain, none reading through
    for name in list(model.snaps):
        await pool.delete_snapshot("v", name)
        del model.snaps[name]
    await verify(pool, model)
    table = pool._table
    live = table.lineages[1].live
    assert not table.lineages[1].history
    assert pool.space().used_bytes == len(live) * SEG
    assert all(table.below(1, lg, p) is None for lg, p in live.items())
    await pool.close()
    again = await Pool.open(dev)
    await verify(again, model)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=5, max_size=60))
def test_partial_versions_match_a_model(ops: list[tuple]) -> None:
    asyncio.run(run(ops))

