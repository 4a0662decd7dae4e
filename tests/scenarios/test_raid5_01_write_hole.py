"""Scenario r5-01: the write hole.

What fails: the head loses power after the new data of one chunk reached its
member but before the stripe's parity did; then the member holding another,
untouched chunk of that stripe is lost. What must hold: with the partial
parity log, the untouched chunk reads back exactly as acknowledged. With the
log switched off (test-only switch) the same sequence returns wrong bytes for
that untouched chunk: the difference is the log.
"""

import asyncio
import os

import pytest

from opie.raid5.assemble import assemble
from opie.raid5.testing import PowerCut, rig

CHUNK = 16384


async def scenario(journal: bool) -> tuple[bytes, bytes]:
    r = rig(4, stripes=8, chunk_size=CHUNK)
    arr = await r.create(journal=journal)
    g = arr.geom
    old = os.urandom(3 * CHUNK)
    await arr.write(0, old, fua=True)                     # stripe 0: D0 D1 D2 on roles 0 1 2, P on 3
    parity_before = await r.mems[3].read(g.chunk_offset(0), CHUNK)
    # Power fails at the first write of stripe 0's parity: D1 is already new on disk.
    r.cut.when = lambda name, off, n: name == "disk3" and off >= g.data_offset
    r.cut.tear = False
    with pytest.raises(PowerCut):
        await arr.write(CHUNK, os.urandom(CHUNK))
    assert await r.mems[3].read(g.chunk_offset(0), CHUNK) == parity_before, "parity must be old"
    assert await r.mems[1].read(g.chunk_offset(0), CHUNK) != old[CHUNK:2 * CHUNK], "D1 must be new"
    r.power_loss()
    # Reboot with disk0 (untouched D0) gone.
    arr2 = await assemble([r.disks[3], r.disks[1], r.disks[2]], journal=journal)
    assert arr2.state_string() == "_UUU"
    return old[:CHUNK], await arr2.read(0, CHUNK)


def test_write_hole_closed_by_partial_parity_log():
    acknowledged, got = asyncio.run(scenario(journal=True))
    assert got == acknowledged


def test_write_hole_open_without_log():
    acknowledged, got = asyncio.run(scenario(journal=False))
    assert got != acknowledged
