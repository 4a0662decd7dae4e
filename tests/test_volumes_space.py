"""Space: thin provisioning, ENOSPC without damage, space back on delete,
and changed-segment maps for incremental backups."""

from __future__ import annotations

import asyncio
import errno
import random

import pytest

from opie.head.volumes import MemoryDevice, Pool

SEG = 16 * 1024


def fill(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def enospc_scenario() -> None:
    dev = MemoryDevice(2 << 20)
    pool = await Pool.format(dev, segment_size=SEG, max_entries=62, journal_blocks=16)
    total = pool.space().total_bytes
    vol_size = 512 * 1024                       # 32 segments
    await pool.create_volume("thin", 4 * total)  # over-provisioned: allowed, it is thin
    await pool.create_volume("data", vol_size)
    vol = pool.open_volume("data")
    expected = bytearray(vol_size)
    frozen: dict[str, bytes] = {}
    chunk = 48 * 1024                           # 3 segments, last one partial at the end
    failed = None
    for round_ in range(100):
        for off in range(0, vol_size, chunk):
            data = fill(round_ * 1000 + off, min(chunk, vol_size - off) - 512)
            try:
                await vol.write(off + 512, data)
            except OSError as exc:
                failed = exc
                break
            expected[off + 512:off + 512 + len(data)] = data
        if failed:
            break
        await pool.create_snapshot("data", f"r{round_}")
        frozen[f"r{round_}"] = bytes(expected)
    assert failed is not None and failed.errno == errno.ENOSPC
    assert len(frozen) >= 2
    # the failed write changed nothing; all data and snapshots intact
    assert await vol.read(0, vol_size) == expected
    for name, content in frozen.items():
        assert await pool.open_snapshot("data", name).read(0, vol_size) == content
    assert pool.check().problems == []
    assert pool.space().free_bytes < 3 * SEG
    # a write that must copy still fails cleanly, again and again
    with pytest.raises(OSError) as again:
        await vol.write(0, b"x" * vol_size)
    assert again.value.errno == errno.ENOSPC
    assert await vol.read(0, vol_size) == expected
    # deleting the oldest snapshot gives back exactly what it held alone
    oldest = pool.list_snapshots("data")[0]
    free_before = pool.space().free_bytes
    await pool.delete_snapshot("data", oldest.name)
    del frozen[oldest.name]
    assert oldest.exclusive_bytes > 0
    assert pool.space().free_bytes == free_before + oldest.exclusive_bytes
    await vol.write(0, b"x" * vol_size, fua=True)
    expected[:] = b"x" * vol_size
    reopened = await Pool.open(dev)
    assert await reopened.open_volume("data").read(0, vol_size) == expected
    for name, content in frozen.items():
        assert await reopened.open_snapshot("data", name).read(0, vol_size) == content
    assert reopened.check().problems == []


def test_enospc_with_snapshots_held_then_space_comes_back() -> None:
    asyncio.run(enospc_scenario())


async def full_volume(overprovision: int) -> tuple[Pool, int]:
    """A 1 MiB pool and volume "v" of `overprovision` times its free space."""
    pool = await Pool.format(MemoryDevice(1 << 20), segment_size=SEG, max_entries=31,
                             journal_blocks=16)
    free = pool.space().free_bytes
    await pool.create_volume("v", overprovision * free)
    return pool, free


async def multi_segment_write_is_all_or_nothing() -> None:
    pool, free = await full_volume(4)
    vol = pool.open_volume("v")
    await vol.write(0, b"a" * (free - 2 * SEG))
    used = pool.space().used_bytes
    with pytest.raises(OSError) as exc:   # needs 3 new segments, 2 are free
        await vol.write(free - 2 * SEG, b"b" * (3 * SEG))
    assert exc.value.errno == errno.ENOSPC
    assert pool.space().used_bytes == used
    assert await vol.read(free - 2 * SEG, 3 * SEG) == bytes(3 * SEG)
    assert pool.check().problems == []


def test_write_that_cannot_be_placed_writes_nothing() -> None:
    asyncio.run(multi_segment_write_is_all_or_nothing())


async def trimmed_space_returns_after_commit() -> None:
    pool, free = await full_volume(1)
    vol = pool.open_volume("v")
    await vol.write(0, b"a" * free)
    assert pool.space().free_bytes == 0
    await vol.trim(0, 4 * SEG)
    assert pool.space().pending_bytes == 4 * SEG
    # a write needing space commits the pending frees instead of failing
    await pool.create_volume("w", SEG)
    await pool.open_volume("w").write(0, b"w" * SEG)
    assert await vol.read(0, 5 * SEG) == bytes(4 * SEG) + b"a" * SEG
    assert pool.check().problems == []


def test_trimmed_space_is_reused() -> None:
    asyncio.run(trimmed_space_returns_after_commit())


def segments_of(ranges: list[tuple[int, int]]) -> set[int]:
    out = set()
    for off, n in ranges:
        assert off % SEG == 0
        out |= set(range(off // SEG, -(-(off + n) // SEG)))
    return out


async def write_segments(vol, rng: random.Random, segments: set[int], size: int) -> None:
    """Touch each segment in `segments`: partial, whole, or several writes."""
    for s in sorted(segments, key=lambda _: rng.random()):
        start = s * SEG
        end = min(size, start + SEG)
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(start, end)
            b = rng.randint(a + 1, end)
            await vol.write(a, rng.randbytes(b - a))


async def changed_scenario(seed: int) -> None:
    rng = random.Random(seed)
    pool = await Pool.format(MemoryDevice(4 << 20), segment_size=SEG, max_entries=31)
    nseg = 40
    size = nseg * SEG - 1024          # last segment partial
    await pool.create_volume("v", size)
    vol = pool.open_volume("v")
    base = set(rng.sample(range(nseg), 25))
    await write_segments(vol, rng, base, size)
    assert segments_of(pool.allocated_segments("v")) == base
    await pool.create_snapshot("v", "s1")
    assert segments_of(pool.allocated_segments("v", "s1")) == base
    assert pool.changed_segments("v", "s1") == []
    w2 = set(rng.sample(range(nseg), 12))
    await write_segments(vol, rng, w2, size)
    assert segments_of(pool.changed_segments("v", "s1")) == w2
    await pool.create_snapshot("v", "s2")
    w3 = set(rng.sample(range(nseg), 7))
    await write_segments(vol, rng, w3, size)
    trimmed = rng.choice(sorted(base - w3))
    await vol.trim(trimmed * SEG, SEG)
    assert segments_of(pool.changed_segments("v", "s1", "s2")) == w2
    assert segments_of(pool.changed_segments("v", "s2")) == w3 | {trimmed}
    assert segments_of(pool.changed_segments("v", "s1")) == w2 | w3 | {trimmed}
    # the map survives deleting the snapshot in between, and a reopen
    await pool.delete_snapshot("v", "s2")
    await vol.flush()
    again = await Pool.open(pool._dev)
    assert segments_of(again.changed_segments("v", "s1")) == w2 | w3 | {trimmed}
    assert again.check().problems == []
    # the ranges cover exactly the changed bytes' segments, clipped to the size
    ranges = again.changed_segments("v", "s1")
    assert all(off + n <= size for off, n in ranges)


@pytest.mark.parametrize("seed", range(6))
def test_changed_segments_are_exactly_the_segments_written(seed: int) -> None:
    asyncio.run(changed_scenario(seed))
