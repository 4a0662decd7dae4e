"""Scenario r5-04: unclean stop, resync of dirty stripes only.

What fails: the head loses power with writes to a few stripes in flight or
unflushed, on a 64-stripe array where everything else was flushed. What must
hold: assembly resyncs only the stripes of the regions dirty in the
write-intent bitmap (counted in member I/O and in the resync phase), every
flushed byte reads back, and scrub finds no parity mismatch.
"""

import asyncio
import os
import random

import pytest

from opie.raid5.assemble import assemble
from opie.raid5.phases import PhaseKind, PhaseState
from opie.raid5.scrub import scrub
from opie.raid5.testing import PowerCut, rig

CHUNK = 16384
STRIPES = 64


async def run() -> None:
    r = rig(4, stripes=STRIPES, chunk_size=CHUNK, volatile=True)
    arr = await r.create()
    g = arr.geom
    durable = bytes(await r.fill())
    touched = (3, 30, 31, 50)
    for s in touched[:3]:
        await arr.write(s * g.stripe_data_size + 5000, os.urandom(9000))
    r.cut.arm(5)
    with pytest.raises(PowerCut):
        await arr.write(touched[3] * g.stripe_data_size, os.urandom(CHUNK))
    r.power_loss(random.Random(4))
    for d in r.disks:
        d.reset_count()

    arr2 = await assemble(r.disks)
    phase = arr2.phases[PhaseKind.RESYNC]
    assert phase.state is PhaseState.DONE and phase.total == len(touched)
    # resync reads each dirty stripe's chunks, never the whole array
    total_read = sum(d.count.read_bytes for d in r.disks)
    metadata = sum(4096 + g.ppl_size for _ in r.disks)          # superblock + log ring scan
    assert total_read - metadata <= 3 * len(touched) * 4 * CHUNK
    assert arr2.dirty_regions == set()
    got = await arr2.read(0, arr2.size)
    for pos in range(0, arr2.size, 4096):
        s = pos // g.stripe_data_size
        if s not in touched:
            assert got[pos:pos + 4096] == durable[pos:pos + 4096], pos
    rep = await scrub(arr2)
    assert (rep.mismatches, rep.unrecoverable, rep.repaired) == (0, 0, 0)


def test_unclean_stop_resyncs_dirty_stripes_only():
    asyncio.run(run())
