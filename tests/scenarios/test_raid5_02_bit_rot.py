"""Scenario r5-02: bit rot.

What fails: random 4 KiB blocks on random members (data and parity alike) get
bits flipped on disk behind the array's back, at most one per row so parity
can still rebuild each. What must hold: reads return the acknowledged bytes
(self-heal from parity, never corrupted data); scrub finds every rotten block,
names its member, repairs it, and a second scrub finds nothing.
"""

import asyncio
import random

from opie.raid5.geometry import BLOCK
from opie.raid5.scrub import scrub
from opie.raid5.testing import corrupt, rig

CHUNK = 16384


def pick(rng: random.Random, geom, members: int, count: int) -> set[tuple[int, int, int]]:
    """`count` distinct (role, stripe, row), no two in the same (stripe, row)."""
    rows: dict[tuple[int, int], int] = {}
    while len(rows) < count:
        rows[(rng.randrange(geom.stripes), rng.randrange(geom.blocks_per_chunk))] = rng.randrange(members)
    return {(role, s, k) for (s, k), role in rows.items()}


async def rot(r, geom, blocks, rng):
    for role, s, k in blocks:
        corrupt(r.mems[role], geom.chunk_offset(s) + k * BLOCK, BLOCK, rng)


async def run() -> None:
    rng = random.Random(7)
    r = rig(5, stripes=24, chunk_size=CHUNK)
    arr = await r.create()
    g = arr.geom
    ref = bytes(await r.fill())

    # Reads heal: rot only data blocks, then read everything back.
    data_rot = {b for b in pick(rng, g, 5, 30) if g.data_index(b[1], b[0]) is not None}
    await rot(r, g, data_rot, rng)
    assert await arr.read(0, arr.size) == ref
    assert sum(arr.stats.repaired.values()) == len(data_rot)
    for role, s, k in data_rot:        # healed on disk too, not only in the reply
        raw = await r.mems[role].read(g.chunk_offset(s) + k * BLOCK, BLOCK)
        i = g.data_index(s, role)
        at = (s * g.data_chunks + i) * CHUNK + k * BLOCK
        assert raw == ref[at:at + BLOCK]

    # Scrub finds the rest, data and parity, and names each member.
    blocks = pick(rng, g, 5, 40)
    await rot(r, g, blocks, rng)
    report = await scrub(arr)
    assert report.repaired == len(blocks)
    assert report.unrecoverable == 0 and report.mismatches == 0
    assert sorted(report.bad) == sorted((f"disk{role}", s, k) for role, s, k in blocks)
    expected = {}
    for role, _, _ in blocks:
        expected[f"disk{role}"] = expected.get(f"disk{role}", 0) + 1
    assert dict(report.by_member) == expected
    assert report.checked == 5 * g.stripes * g.blocks_per_chunk
    assert "repaired 40" in report.summary()

    again = await scrub(arr)
    assert (again.repaired, again.unrecoverable, again.mismatches) == (0, 0, 0)
    assert await arr.read(0, arr.size) == ref

    # Two rotten blocks in one row cannot be rebuilt: an error, never bad data.
    corrupt(r.mems[0], g.chunk_offset(0), BLOCK, rng)
    corrupt(r.mems[1], g.chunk_offset(0), BLOCK, rng)
    try:
        await arr.read(0, BLOCK)
    except OSError as exc:
        assert exc.errno == 5 and "disk" in str(exc)
    else:
        raise AssertionError("a read of an unrecoverable block returned data")
    report = await scrub(arr)
    assert report.unrecoverable == 2
    assert {m for m, _, _ in report.bad} == {"disk0", "disk1"}


def test_bit_rot_healed_and_named():
    asyncio.run(run())
