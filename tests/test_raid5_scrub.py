"""Scrub phases: progress, a checkpoint that survives a crash, and parity
mismatches counted and fixed when checksums cannot say which block is wrong."""

import asyncio

import pytest

from opie.raid5.assemble import assemble
from opie.raid5.geometry import BLOCK
from opie.raid5.phases import PhaseKind, PhaseState
from opie.raid5.scrub import scrub
from opie.raid5.testing import PowerCut, rig

CHUNK = 16384
STRIPES = 32


def test_scrub_resumes_from_checkpoint_after_crash():
    async def go():
        r = rig(4, stripes=STRIPES, chunk_size=CHUNK)
        arr = await r.create()
        ref = await r.fill()
        superblocks = [0]

        def third_checkpoint(name: str, offset: int, length: int) -> bool:
            superblocks[0] += offset == 0
            return superblocks[0] > 4 * 2     # 4 members x 2 checkpoints land, the 3rd is cut

        r.cut.when = third_checkpoint
        with pytest.raises(PowerCut):
            await scrub(arr, checkpoint_every=8)       # cut while writing the 3rd checkpoint
        r.power_loss()
        arr2 = await assemble(r.disks)
        assert arr2.scrub_stripe == 16
        report = await scrub(arr2, checkpoint_every=8)
        phase = arr2.phases[PhaseKind.SCRUB]
        assert phase.state is PhaseState.DONE and phase.done == STRIPES
        assert report.checked == (STRIPES - 16) * 4 * (CHUNK // BLOCK)
        assert arr2.scrub_stripe == 0
        assert await arr2.read(0, arr2.size) == bytes(ref)
    asyncio.run(go())


def test_parity_mismatch_without_checksums_is_counted_and_fixed():
    async def go():
        r = rig(3, stripes=4, chunk_size=CHUNK)
        arr = await r.create()
        # a fresh array has no checksums yet: write data behind the array's back
        g = arr.geom
        await r.mems[0].write(g.chunk_offset(1) + BLOCK, b"\x5a" * BLOCK)
        report = await scrub(arr)
        assert report.mismatches == 1 and report.repaired == 0
        again = await scrub(arr)
        assert again.mismatches == 0
        assert "parity mismatches 0" in again.summary()
    asyncio.run(go())
