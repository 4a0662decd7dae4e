"""Scenario r5-05: a member away across a clean stop and a crash.

What fails: disk1 stops answering; writes land on two stripes; the head stops
cleanly and is assembled again without disk1 (refused as stale if offered);
one more write lands, then the power fails. What must hold: the bitmap of
what disk1 missed survives both restarts, so when disk1 is re-added only
those three stripes are copied to it, and every byte reads back, also after
another member is then lost.
"""

import asyncio
import os

import pytest

from opie.raid5.assemble import assemble
from opie.raid5.errors import AssemblyError
from opie.raid5.phases import PhaseKind
from opie.raid5.recovery import re_add
from opie.raid5.testing import rig

CHUNK = 16384


async def run() -> None:
    r = rig(4, stripes=32, chunk_size=CHUNK, volatile=True)
    arr = await r.create()
    g = arr.geom
    ref = await r.fill()

    async def write(stripe: int) -> None:
        at = stripe * g.stripe_data_size + 100
        data = os.urandom(5000)
        await arr.write(at, data, fua=True)
        ref[at:at + len(data)] = data

    r.disks[1].failed = True
    await write(4)
    await write(17)
    assert arr.state_string() == "U_UU"
    await arr.stop()

    with pytest.raises(AssemblyError, match="disk1: stale"):
        r.disks[1].failed = False
        await assemble(r.disks)
    r.disks[1].failed = True
    arr = await assemble(r.disks)
    assert arr.state_string() == "U_UU" and arr.dirty_regions == {4, 17}
    await write(25)
    r.power_loss()                                   # crash: no stop, no flush
    arr = await assemble([d for i, d in enumerate(r.disks) if i != 1])
    assert arr.dirty_regions == {4, 17, 25}

    r.disks[1].failed = False
    for d in r.disks:
        d.reset_count()
    await (await re_add(arr, r.disks[1]))
    assert arr.state_string() == "UUUU"
    assert arr.phases[PhaseKind.RESYNC].total == 3
    assert r.disks[0].count.read_bytes == 3 * CHUNK
    assert await arr.read(0, arr.size) == ref
    r.disks[3].failed = True                         # disk1 now carries its share
    assert await arr.read(0, arr.size) == ref


def test_member_away_across_restarts_resyncs_only_missed_stripes():
    asyncio.run(run())
