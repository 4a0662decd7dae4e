"""Scenario r5-03: a member away for a few writes.

What fails: disk2 stops answering (EIO) for a while; three writes land on
three stripes meanwhile; then disk2 answers again and is re-added. What must
hold: it is resynced only where it missed writes, counted in member I/O: the
returning member gets three chunks of data (plus a few metadata blocks) and
each other member is read three chunks, not the 64 a full rebuild would move.
Afterwards every byte reads back and scrub finds nothing.
"""

import asyncio
import os

from opie.raid5.assemble import assemble
from opie.raid5.recovery import re_add
from opie.raid5.scrub import scrub
from opie.raid5.errors import AssemblyError
from opie.raid5.phases import PhaseKind, PhaseState
from opie.raid5.testing import rig

CHUNK = 16384
STRIPES = 64


async def run() -> None:
    r = rig(5, stripes=STRIPES, chunk_size=CHUNK)
    arr = await r.create()
    g = arr.geom
    ref = await r.fill()
    assert arr.dirty_regions == set()

    r.disks[2].failed = True
    for stripe in (5, 20, 41):
        at = stripe * g.stripe_data_size + 3 * 4096
        data = os.urandom(2 * 4096)
        await arr.write(at, data)
        ref[at:at + len(data)] = data
    await arr.flush()
    assert arr.state_string() == "UU_UU"
    assert arr.dirty_regions == {5, 20, 41}, "bits stay set while a member is away"

    # While away, it would be refused at assembly as stale.
    r.disks[2].failed = False
    try:
        await assemble(r.disks, start_recovery=False)
    except AssemblyError as exc:
        assert "disk2: stale" in str(exc)
    else:
        raise AssertionError("a stale member was accepted")

    for d in r.disks:
        d.reset_count()
    task = await re_add(arr, r.disks[2])
    await task
    assert arr.state_string() == "UUUUU"
    back = r.disks[2].count
    metadata_writes = 8     # superblocks, bitmap, checksum blocks
    assert back.written_bytes <= 3 * CHUNK + metadata_writes * 4096, back
    assert back.written_bytes >= 3 * CHUNK
    for i in (0, 1, 3, 4):
        assert r.disks[i].count.read_bytes == 3 * CHUNK, (i, r.disks[i].count)
    resync = arr.phases[PhaseKind.RESYNC]
    assert (resync.total, resync.done, resync.state) == (3, 3, PhaseState.DONE)
    assert await arr.read(0, arr.size) == bytes(ref)
    report = await scrub(arr)
    assert (report.repaired, report.unrecoverable, report.mismatches) == (0, 0, 0)
    await arr.flush()
    assert arr.dirty_regions == set()


def test_short_outage_resyncs_only_missed_stripes():
    asyncio.run(run())
