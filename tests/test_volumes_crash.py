"""Crash at every device operation of every metadata commit.

Each step below ends in a commit (a management call, or a write that places
new segments followed by flush or FUA). For each step and each device
operation k inside it, the device dies at operation k (the write in flight
torn at a 512-byte boundary, unflushed writes kept in several patterns). The
reopened pool must hold exactly the state before the step or after it, pass
`check()`, and keep working: one more committed change survives a reopen.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from opie.head.volumes import CrashDevice, Pool
from opie.head.volumes.devices import SimulatedCrash
from opie.head.volumes.records import META_BLOCK

SEG = 8192
KIB = 1024
DEVICE = 1 << 20
WAIT = 10.0   # bound on every wait: a hang is a failure


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def step_write(pool: Pool, vol: str, offset: int, n: int, seed: int, fua: bool) -> None:
    dev = pool.open_volume(vol)
    await dev.write(offset, pattern(seed, n), fua=fua)
    if not fua:
        await dev.flush()


async def step_trim(pool: Pool, vol: str, offset: int, n: int) -> None:
    dev = pool.open_volume(vol)
    await dev.trim(offset, n)
    await dev.flush()


# Every write lands in segments the volume does not own alone (first write
# or shared with a snapshot), or in blocks a partial version does not hold
# yet, so its data is only reachable through the mapping the commit
# installs: the state is exactly old or new. Deleting a@s1 and a@s2 merges
# blocks into partial versions before the commit frees the old ones.
STEPS = [
    ("create volume a", lambda p: p.create_volume("a", 64 * KIB)),
    ("write 3 new segments + flush", lambda p: step_write(p, "a", 0, 20 * KIB, 1, False)),
    ("snapshot a@s1", lambda p: p.create_snapshot("a", "s1")),
    ("CoW write over 3 segments, fua", lambda p: step_write(p, "a", 4 * KIB, 24 * KIB, 2, True)),
    ("fill a partial version in place, unaligned, fua",
     lambda p: step_write(p, "a", 700, 3000, 5, True)),
    ("create volume b", lambda p: p.create_volume("b", 40 * KIB)),
    ("write all of b + flush", lambda p: step_write(p, "b", 0, 40 * KIB, 3, False)),
    ("snapshot a@s2", lambda p: p.create_snapshot("a", "s2")),
    ("trim a segment + flush", lambda p: step_trim(p, "a", 8 * KIB, 8 * KIB)),
    ("delete snapshot a@s1", lambda p: p.delete_snapshot("a", "s1")),
    ("grow a", lambda p: p.resize_volume("a", 96 * KIB)),
    ("shrink a (CoW of the tail)", lambda p: p.resize_volume("a", 20 * KIB)),
    ("snapshot b@s3", lambda p: p.create_snapshot("b", "s3")),
    ("CoW write all of b + flush", lambda p: step_write(p, "b", 0, 40 * KIB, 4, False)),
    ("delete snapshot a@s2", lambda p: p.delete_snapshot("a", "s2")),
    ("delete volume b with its snapshot", lambda p: p.delete_volume("b", recursive=True)),
]


async def state_of(pool: Pool) -> dict:
    out: dict = {}
    for info in pool.list_volumes():
        out[info.name] = (info.size, await pool.open_volume(info.name).read(0, info.size))
    for snap in pool.list_snapshots():
        dev = pool.open_snapshot(snap.volume, snap.name)
        out[f"{snap.volume}@{snap.name}"] = (snap.size, await dev.read(0, snap.size))
    return out


def region(geo, offset: int) -> str:
    if offset < 2 * META_BLOCK:
        return "superblock"
    if offset < geo.journal_start:
        return "metadata page"
    if offset < geo.data_start:
        return "journal"
    return "data"


class Recorder(CrashDevice):
    """Names each operation after the region it writes."""

    def __init__(self, size: int, image: bytes | None = None) -> None:
        super().__init__(size, image)
        self.log: list[tuple[int, str]] = []

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.log.append((offset, "fua" if fua else "write"))
        await super().write(offset, data, fua)

    async def flush(self) -> None:
        self.log.append((-1, "flush"))
        await super().flush()


async def build(upto: int) -> tuple[Recorder, Pool]:
    dev = Recorder(DEVICE)
    # a journal of 8 blocks forces a checkpoint every few commits
    pool = await Pool.format(dev, segment_size=SEG, max_entries=31, journal_blocks=8)
    for _, step in STEPS[:upto]:
        await step(pool)
    return dev, pool


async def crash_matrix() -> set[str]:
    points_seen: set[str] = set()
    for i, (name, step) in enumerate(STEPS):
        dev, pool = await build(i)
        old = await state_of(pool)
        start = len(dev.log)
        await step(pool)
        new = await state_of(pool)
        geo = pool._geo
        points = [("flush" if off < 0 else f"{kind} {region(geo, off)}")
                  for off, kind in dev.log[start:]]
        assert old != new, name
        for k, point in enumerate(points):
            dev, pool = await build(i)
            dev.fail_at = dev.ops + k
            with pytest.raises(SimulatedCrash):
                await step(pool)
            points_seen.add(point)
            for seed in range(3):
                rng = random.Random(seed)
                image = dev.crash_image(rng, keep=(0.0, 1.0, 0.5)[seed], tear=seed != 1)
                after = await Pool.open(CrashDevice(DEVICE, image))
                got = await state_of(after)
                where = f"step {i} ({name}), crash at op {k} ({point}), image {seed}"
                assert got in (old, new), where
                assert after.check().problems == [], where
                await after.create_volume("post", 16 * KIB)
                await after.open_volume("post").write(0, b"p" * SEG, fua=True)
                again = await Pool.open(after._dev)
                expected = dict(got, post=(16 * KIB, b"p" * SEG + bytes(8 * KIB)))
                assert await state_of(again) == expected, where
                assert again.check().problems == [], where
    return points_seen


def test_crash_at_every_metadata_write_point_leaves_old_or_new_state() -> None:
    seen = asyncio.run(crash_matrix())
    # the enumeration really covered data, journal, checkpoint and superblock writes
    assert {"write data", "fua journal", "flush", "write metadata page",
            "fua superblock"} <= seen, seen


class HeldFlushDevice(CrashDevice):
    """A crash device whose flushes, once `hold` is set, wait for `go`."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.hold = False
        self.holding = asyncio.Event()
        self.go = asyncio.Event()

    async def flush(self) -> None:
        if self.hold:
            self.holding.set()
            await self.go.wait()
        await super().flush()


def test_fua_write_into_a_version_a_snapshot_delete_merged_survives_a_crash_before_its_commit() -> None:
    """Found by the concurrent property test: deleting a@s1 merges the blocks
    the partial version lacks into it and marks it whole in memory, then
    commits. A FUA write landing in place in that version before the commit
    is durable returned at once; a crash then left the version partial (as
    last committed) and the acknowledged block read the snapshot's old bytes."""
    async def go() -> None:
        dev = HeldFlushDevice(DEVICE)
        pool = await Pool.format(dev, segment_size=SEG, max_entries=31)
        await pool.create_volume("a", SEG)
        vol = pool.open_volume("a")
        await vol.write(0, b"o" * SEG, fua=True)
        await pool.create_snapshot("a", "s1")
        await vol.write(SEG - 512, b"c" * 512, fua=True)      # a partial version: one block
        dev.hold = True
        delete = asyncio.ensure_future(pool.delete_snapshot("a", "s1"))
        await asyncio.wait_for(dev.holding.wait(), WAIT)     # merged; its commit waits
        dev.hold = False
        write = asyncio.ensure_future(vol.write(512, b"n" * 512, fua=True))
        for _ in range(100):
            await asyncio.sleep(0)
        acked = write.done()
        image = dev.crash_image(random.Random(0), keep=0.0, tear=False)   # the power fails
        after = await Pool.open(CrashDevice(DEVICE, image))
        got = await after.open_volume("a").read(512, 512)
        assert not acked or got == b"n" * 512, "an acknowledged FUA write was lost"
        dev.go.set()
        await asyncio.wait_for(asyncio.gather(delete, write), WAIT)

    asyncio.run(go())
