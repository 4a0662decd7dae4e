"""The pool's management API, block-device behaviour and concurrency."""

from __future__ import annotations

import asyncio
import errno
import random

import pytest

from opie.head.volumes import (CrashDevice, FileDevice, MemoryDevice, NotFoundError, Pool,
                          ValidationError)

SEG = 16 * 1024


class SlowDevice(MemoryDevice):
    """Yields to the loop inside every I/O, in a seeded random pattern, so
    concurrent requests really interleave."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.rng = random.Random(7)

    async def _yield(self) -> None:
        for _ in range(self.rng.randint(0, 3)):
            await asyncio.sleep(0)

    async def read(self, offset: int, length: int) -> bytes:
        await self._yield()
        return await super().read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._yield()
        await super().write(offset, data, fua)


async def new_pool(size: int = 2 << 20) -> Pool:
    return await Pool.format(SlowDevice(size), segment_size=SEG, max_entries=62)


def run(coro):
    return asyncio.run(coro)


def test_bad_input_is_refused_and_changes_nothing() -> None:
    async def body() -> None:
        pool = await new_pool()
        await pool.create_volume("good", 64 * 1024)
        await pool.create_snapshot("good", "s")
        before = (pool.list_volumes(), pool.list_snapshots(), pool.space())
        bad_calls = [
            lambda: pool.create_volume("", 4096),
            lambda: pool.create_volume("-dash", 4096),
            lambda: pool.create_volume("a/b", 4096),
            lambda: pool.create_volume("x" * 65, 4096),
            lambda: pool.create_volume("ünï", 4096),
            lambda: pool.create_volume(7, 4096),
            lambda: pool.create_volume("good", 4096),
            lambda: pool.create_volume("fine", 0),
            lambda: pool.create_volume("fine", 1000),
            lambda: pool.create_volume("fine", -512),
            lambda: pool.create_volume("fine", True),
            lambda: pool.create_snapshot("good", "s"),
            lambda: pool.create_snapshot("good", "bad name"),
            lambda: pool.resize_volume("good", 100),
            lambda: pool.delete_volume("good"),          # has a snapshot
        ]
        for call in bad_calls:
            with pytest.raises(ValidationError):
                await call()
        for call in [lambda: pool.delete_snapshot("good", "nope"),
                     lambda: pool.create_snapshot("nope", "s"),
                     lambda: pool.delete_volume("nope")]:
            with pytest.raises(NotFoundError):
                await call()
        with pytest.raises(NotFoundError):
            pool.open_volume("nope")
        assert (pool.list_volumes(), pool.list_snapshots(), pool.space()) == before
        again = await Pool.open(pool._dev)
        assert [v.name for v in again.list_volumes()] == ["good"]
    run(body())


def test_catalog_full_is_a_validation_error() -> None:
    async def body() -> None:
        pool = await Pool.format(MemoryDevice(1 << 20), segment_size=SEG, max_entries=31)
        await pool.create_volume("v", SEG)
        for i in range(30):
            await pool.create_snapshot("v", f"s{i}")
        with pytest.raises(ValidationError):
            await pool.create_snapshot("v", "one-too-many")
        assert len(pool.list_snapshots("v")) == 30
        assert pool.check().problems == []
    run(body())


def test_block_device_edges() -> None:
    async def body() -> None:
        pool = await new_pool()
        await pool.create_volume("v", 100 * 1024)
        vol = pool.open_volume("v")
        assert await vol.read(0, 100 * 1024) == bytes(100 * 1024)   # thin: zeros, no space
        assert pool.space().used_bytes == 0
        for off, n in [(-1, 1), (100 * 1024, 1), (100 * 1024 - 10, 11)]:
            with pytest.raises(OSError) as exc:
                await vol.read(off, n)
            assert exc.value.errno == errno.EINVAL
            with pytest.raises(OSError) as exc:
                await vol.write(off, b"x" * max(n, 1))
            assert exc.value.errno == errno.EINVAL
        await vol.write(100 * 1024 - 3, b"end")
        await pool.create_snapshot("v", "s")
        snap = pool.open_snapshot("v", "s")
        for call in (snap.write(0, b"x"), snap.trim(0, 512), snap.write_zeroes(0, 512)):
            with pytest.raises(OSError) as exc:
                await call
            assert exc.value.errno == errno.EROFS
        assert await snap.read(100 * 1024 - 3, 3) == b"end"
        await vol.write_zeroes(100 * 1024 - 3, 3)
        assert await vol.read(100 * 1024 - 3, 3) == bytes(3)
        assert await snap.read(100 * 1024 - 3, 3) == b"end"
        await pool.delete_volume("v", recursive=True)
        for call in (vol.read(0, 1), vol.write(0, b"x"), snap.read(0, 1)):
            with pytest.raises(OSError) as exc:
                await call
            assert exc.value.errno == errno.ENODEV
        assert pool.space().used_bytes == 0
        assert pool.check().problems == []
    run(body())


def test_resize_grow_and_shrink_keep_snapshots() -> None:
    async def body() -> None:
        pool = await new_pool()
        await pool.create_volume("v", 4 * SEG)
        vol = pool.open_volume("v")
        data = random.randbytes(4 * SEG)
        await vol.write(0, data)
        await pool.create_snapshot("v", "s")
        await pool.resize_volume("v", SEG + 1024)
        await pool.resize_volume("v", 6 * SEG)
        assert vol.size == 6 * SEG
        assert await vol.read(0, 6 * SEG) == data[:SEG + 1024] + bytes(5 * SEG - 1024)
        assert await pool.open_snapshot("v", "s").read(0, 4 * SEG) == data
        await pool.delete_snapshot("v", "s")
        assert pool.space().used_bytes == 2 * SEG
        again = await Pool.open(pool._dev)
        assert again.list_volumes()[0].size == 6 * SEG
        assert await again.open_volume("v").read(0, 6 * SEG) == await vol.read(0, 6 * SEG)
        assert again.check().problems == []
    run(body())


def test_snapshot_listing_and_space_accounting() -> None:
    async def body() -> None:
        pool = await new_pool()
        await pool.create_volume("v", 8 * SEG)
        vol = pool.open_volume("v")
        await vol.write(0, b"a" * 8 * SEG)
        await pool.create_snapshot("v", "one")
        await vol.write(0, b"b" * 3 * SEG)          # 3 segments now held only by "one"
        await pool.create_snapshot("v", "two")
        snaps = pool.list_snapshots("v")
        assert [s.name for s in snaps] == ["one", "two"]
        assert all(s.volume == "v" and s.size == 8 * SEG and s.created > 0 for s in snaps)
        assert [s.exclusive_bytes for s in snaps] == [3 * SEG, 0]
        assert pool.space().used_bytes == 11 * SEG
        info = pool.list_volumes()[0]
        assert (info.name, info.mapped_bytes, info.snapshots) == ("v", 8 * SEG, 2)
        await pool.delete_snapshot("v", "one")
        assert pool.space().used_bytes == 8 * SEG
    run(body())


def test_concurrent_writes_to_shared_segments_copy_once() -> None:
    """Many writes to disjoint byte ranges race on segments a snapshot
    shares: no write is lost (each segment is copied once, under its lock),
    the snapshot keeps its contents, and no segment is leaked."""
    async def body() -> None:
        pool = await new_pool()
        size = 8 * SEG
        await pool.create_volume("v", size)
        vol = pool.open_volume("v")
        base = random.Random(1).randbytes(size)
        await vol.write(0, base)
        await pool.create_snapshot("v", "s")
        rng = random.Random(2)
        cuts = sorted(rng.sample(range(1, size), 80))
        writes = [(a, rng.randbytes(b - a)) for a, b in zip([0] + cuts, cuts + [size])]
        rng.shuffle(writes)
        await asyncio.gather(*(vol.write(off, data) for off, data in writes))
        expected = bytearray(size)
        for off, data in writes:
            expected[off:off + len(data)] = data
        assert await vol.read(0, size) == expected
        assert await pool.open_snapshot("v", "s").read(0, size) == base
        assert pool.space().used_bytes == 16 * SEG
        assert pool.check().problems == []
    run(body())


def test_snapshot_waits_for_writes_in_flight() -> None:
    async def body() -> None:
        pool = await new_pool()
        await pool.create_volume("v", 8 * SEG)
        vol = pool.open_volume("v")
        first = [vol.write(i * SEG, bytes([i + 1]) * SEG) for i in range(8)]
        snap = pool.create_snapshot("v", "s")
        later = [vol.write(i * SEG, b"\xff" * SEG) for i in range(8)]
        await asyncio.gather(*first, snap, *later)
        frozen = await pool.open_snapshot("v", "s").read(0, 8 * SEG)
        assert frozen == b"".join(bytes([i + 1]) * SEG for i in range(8))
        assert await vol.read(0, 8 * SEG) == b"\xff" * 8 * SEG
    run(body())


def test_file_device_pool_survives_reopen(tmp_path) -> None:
    async def body() -> None:
        path = str(tmp_path / "pool.img")
        dev = FileDevice(path, 4 << 20)
        pool = await Pool.format(dev, segment_size=64 * 1024, max_entries=62)
        await pool.create_volume("v", 1 << 20)
        vol = pool.open_volume("v")
        data = random.randbytes(300_000)
        await vol.write(12345, data, fua=True)
        await pool.create_snapshot("v", "s")
        await vol.write(12345, b"new", fua=True)
        dev.close()
        dev = FileDevice(path, 4 << 20)
        again = await Pool.open(dev)
        assert await again.open_volume("v").read(12345, 3) == b"new"
        assert await again.open_snapshot("v", "s").read(12345, len(data)) == data
        assert again.check().problems == []
        await again.close()
        dev.close()
    run(body())


def test_check_reports_a_leak_and_a_double_owner() -> None:
    async def body() -> None:
        pool = await new_pool()
        await pool.create_volume("v", 4 * SEG)
        await pool.open_volume("v").write(0, b"x" * 2 * SEG)
        assert pool.check().ok
        leaked = pool._alloc.take(1)[0]          # taken and never mapped
        report = pool.check()
        assert not report.ok and any("leaked" in p for p in report.problems)
        pool._alloc.give_back([leaked])
        owned = pool._table.lineages[1].live[0]
        pool._alloc.give_back([owned])             # mapped and on the free list
        assert any("free but owned" in p for p in pool.check().problems)
    run(body())


def test_fua_write_racing_a_commit_is_durable() -> None:
    """A FUA overwrite of a segment whose mapping a concurrent commit is
    making durable: the commit may flush before this write's data lands, so
    the write must still end in its own flush."""
    class SlowDataWrites(CrashDevice):
        async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
            if len(data) < SEG:                # the small in-place data write is slow
                for _ in range(20):
                    await asyncio.sleep(0)
            await super().write(offset, data, fua)

    async def body() -> None:
        dev = SlowDataWrites(2 << 20)
        pool = await Pool.format(dev, segment_size=SEG, max_entries=31)
        await pool.create_volume("v", 4 * SEG)
        vol = pool.open_volume("v")
        await vol.write(0, b"a" * SEG)                 # placed, mapping not yet durable
        await asyncio.gather(vol.flush(), vol.write(100, b"FUA", fua=True))
        image = dev.crash_image(random.Random(0), keep=0.0, tear=False)
        after = await Pool.open(CrashDevice(len(image), image))
        assert await after.open_volume("v").read(98, 7) == b"aaFUAaa"
    run(body())
