"""Reads racing the management calls that free segments (issue 9, 2.3 and 2.4).

Each test pauses a read inside the device (after it resolved its mapping),
runs a delete or shrink and another volume's allocation and write, then lets
the read go on. A read in flight must complete on the old mapping or fail
(ENODEV for a deleted volume or snapshot, EINVAL beyond a shrunk end); it
must never return bytes another volume wrote into the freed segments.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from opie.head.volumes import MemoryDevice, Pool

SEG = 16 * 1024
WAIT = 10.0   # bound on every test body: a hang is a failure, not a stuck run


class PausingDevice(MemoryDevice):
    """A memory device whose next read, once armed, stops inside the device
    until released (so the read has resolved its mapping and holds whatever
    locks it holds)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.armed = False

    def arm(self) -> None:
        self.armed = True
        self.entered.clear()
        self.release.clear()

    async def read(self, offset: int, length: int) -> bytes:
        if self.armed:
            self.armed = False
            self.entered.set()
            await self.release.wait()
        return await super().read(offset, length)


async def new_pool() -> tuple[Pool, PausingDevice]:
    dev = PausingDevice(2 << 20)
    return await Pool.format(dev, segment_size=SEG, max_entries=62), dev


async def paused_read(dev: PausingDevice, read) -> asyncio.Task:
    """Start `read()` and return once it is stopped inside the device."""
    dev.arm()
    task = asyncio.ensure_future(read())
    await dev.entered.wait()
    return task


MINE, THEIRS = b"A" * (4 * SEG), b"B" * (4 * SEG)


async def written_volume(pool: Pool, name: str, data: bytes):
    """A new volume holding `data`, flushed."""
    await pool.create_volume(name, len(data))
    vol = pool.open_volume(name)
    await vol.write(0, data)
    await vol.flush()
    return vol


async def write_other_volume(pool: Pool, data: bytes) -> None:
    """Allocate a new volume and fill it: it takes the lowest free segments,
    which are the ones a delete or shrink just gave back."""
    await written_volume(pool, "other", data)


async def outcome(task: asyncio.Task) -> bytes | int | None:
    """What the call returned (a read's bytes), or the errno it failed with."""
    try:
        return await task
    except OSError as exc:
        return exc.errno


def show(result: bytes | int | None) -> str:
    if result is None:
        return "success"
    if isinstance(result, int):
        return errno.errorcode.get(result, str(result))
    return f"{len(result)} bytes of {sorted(set(result))[:4]}"


@pytest.mark.parametrize("change, at, refusal", [
    (lambda pool: pool.delete_volume("a"), 0, errno.ENODEV),
    (lambda pool: pool.resize_volume("a", 2 * SEG), 3 * SEG, errno.EINVAL),   # the last segment
], ids=["delete", "shrink"])
def test_read_in_flight_across_a_delete_or_shrink_never_sees_another_volume(
        change, at: int, refusal: int) -> None:
    async def body() -> None:
        pool, dev = await new_pool()
        vol = await written_volume(pool, "a", MINE)
        first = await paused_read(dev, lambda: vol.read(at, SEG))
        changing = asyncio.ensure_future(change(pool))
        queued = asyncio.ensure_future(vol.read(at, SEG))     # arrives after the change
        writing = asyncio.ensure_future(write_other_volume(pool, THEIRS))
        dev.release.set()
        got, late = await outcome(first), await outcome(queued)
        await asyncio.gather(changing, writing)
        assert got in (MINE[at:at + SEG], refusal), f"the read returned {show(got)}"
        assert late == refusal, f"the read queued behind the change returned {show(late)}"
        assert await pool.open_volume("other").read(0, len(THEIRS)) == THEIRS
        if "a" in {v.name for v in pool.list_volumes()}:      # shrunk: the rest is intact
            assert await vol.read(0, 2 * SEG) == MINE[:2 * SEG]
        assert pool.check().problems == []
    asyncio.run(asyncio.wait_for(body(), WAIT))


def test_snapshot_read_queued_behind_its_delete_gets_enodev() -> None:
    async def body() -> None:
        pool, dev = await new_pool()
        old, new = b"O" * (2 * SEG), b"N" * SEG
        await pool.create_volume("v", len(old))
        vol = pool.open_volume("v")
        await vol.write(0, old)
        await pool.create_snapshot("v", "s")
        await vol.write(0, new)                   # segment 0's old version: only "s" sees it
        snap = pool.open_snapshot("v", "s")
        first = await paused_read(dev, lambda: snap.read(0, SEG))  # holds segment 0's lock
        deleting = asyncio.ensure_future(pool.delete_snapshot("v", "s"))  # waits for that lock
        queued = asyncio.ensure_future(snap.read(0, SEG))          # waits behind the delete
        dev.release.set()
        got = await outcome(first)
        await deleting
        late = await outcome(queued)
        assert got == old[:SEG]
        assert late == errno.ENODEV, f"the read of a deleted snapshot returned {show(late)}"
        assert await vol.read(0, 2 * SEG) == new + old[SEG:]
        assert pool.check().problems == []
    asyncio.run(asyncio.wait_for(body(), WAIT))


def test_snapshot_reads_fail_after_a_recursive_volume_delete() -> None:
    async def body() -> None:
        pool, dev = await new_pool()
        await pool.create_volume("v", 2 * SEG)
        await pool.open_volume("v").write(0, b"x" * (2 * SEG))
        await pool.create_snapshot("v", "s")
        snap = pool.open_snapshot("v", "s")
        first = await paused_read(dev, lambda: snap.read(0, SEG))
        deleting = asyncio.ensure_future(pool.delete_volume("v", recursive=True))
        queued = asyncio.ensure_future(snap.read(0, SEG))        # behind the delete
        dev.release.set()
        got = await outcome(first)
        await deleting
        assert got in (b"x" * SEG, errno.ENODEV)
        assert await outcome(queued) == errno.ENODEV
        with pytest.raises(OSError) as exc:
            await snap.read(0, SEG)
        assert exc.value.errno == errno.ENODEV
        assert pool.check().problems == []
    asyncio.run(asyncio.wait_for(body(), WAIT))


def test_write_and_trim_queued_behind_a_shrink_are_refused() -> None:
    """A write or trim that checked its range against the old size and then
    waited for the shrink must not map segments beyond the new end."""
    async def body() -> None:
        pool, dev = await new_pool()
        vol = await written_volume(pool, "a", MINE)
        first = await paused_read(dev, lambda: vol.read(3 * SEG, SEG))   # the shrink waits for it
        shrinking = asyncio.ensure_future(pool.resize_volume("a", 2 * SEG))
        writing = asyncio.ensure_future(vol.write(3 * SEG, THEIRS[:SEG]))
        trimming = asyncio.ensure_future(vol.trim(2 * SEG, 2 * SEG))
        dev.release.set()
        await outcome(first)
        await shrinking
        wrote, trimmed = await outcome(writing), await outcome(trimming)
        assert wrote == errno.EINVAL, f"the write queued behind the shrink returned {show(wrote)}"
        assert trimmed == errno.EINVAL, f"the trim queued behind the shrink returned {show(trimmed)}"
        assert pool.check().problems == []
    asyncio.run(asyncio.wait_for(body(), WAIT))
