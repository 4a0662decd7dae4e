"""The passive head's warm copy of the mapping table (issue 10, point 4).

The pool's commit hook hands every committed metadata transaction to the
mirror before the commit returns; the mirror sends it over mutual TLS (head
certificates only) to the passive, which persists it before it acknowledges.
"""
from __future__ import annotations

import asyncio

from opie.head.volumes import MemoryDevice, Pool
from opie.head.volumes.core import MetadataCommit

SEG = 16 * 1024
DEV = 2 << 20


async def new_pool() -> tuple[Pool, MemoryDevice]:
    device = MemoryDevice(DEV)
    return await Pool.format(device, segment_size=SEG, max_entries=62), device


async def committed(device: MemoryDevice) -> list[bytes]:
    """The committed metadata pages of the pool on `device`, as reopening it gives them."""
    base = await (await Pool.open(device)).set_commit_hook(None)
    return [base.pages[p] for p in sorted(base.pages)]


def test_commit_hook_sees_every_transaction_in_order_before_the_commit_returns() -> None:
    async def body() -> None:
        pool, device = await new_pool()
        seen: list[MetadataCommit] = []
        release = asyncio.Event()

        async def hook(record: MetadataCommit) -> None:
            seen.append(record)
            await release.wait()

        base = await pool.set_commit_hook(hook)
        assert base.seq == 0 and sorted(base.pages) == list(range(len(base.pages)))
        assert pool.generation == (base.pool_uuid, 0)
        copy = dict(base.pages)
        create = asyncio.create_task(pool.create_volume("v", 256 * 1024))
        while not seen:
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert not create.done()            # the commit waits for the hook
        release.set()
        await asyncio.wait_for(create, 5)
        dev = pool.open_volume("v")
        await dev.write(0, b"x" * SEG)
        await dev.flush()
        await pool.create_snapshot("v", "s1")
        await dev.write(SEG, b"y" * 512)
        await dev.flush()
        await pool.delete_snapshot("v", "s1")
        assert [r.seq for r in seen] == list(range(1, len(seen) + 1))
        assert all(r.pool_uuid == base.pool_uuid for r in seen)
        for r in seen:
            copy.update(r.pages)
        assert pool.generation == (base.pool_uuid, seen[-1].seq)
        assert [copy[p] for p in sorted(copy)] == await committed(device)
        assert (await Pool.open(device)).generation == pool.generation
    asyncio.run(body())
