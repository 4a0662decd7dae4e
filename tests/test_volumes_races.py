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


async def outcome(task: asyncio.Task) -> bytes | int:
    """The read's bytes, or the errno it failed with."""
    try:
        return await task
    except OSError as exc:
        return exc.errno


def show(result: bytes | int) -> str:
    if isinstance(result, int):
        return errno.errorcode.get(result, str(result))
    return f"{len(result)} bytes of {sorted(set(result))[:4]}"


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
