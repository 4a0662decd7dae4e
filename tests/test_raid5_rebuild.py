"""Rebuild onto a replacement: background, rate limited, progress visible,
I/O continuing, and resumable from its checkpoint after a crash."""

import asyncio
import os
import random

import pytest

from opie.raid5.assemble import assemble
from opie.raid5.member import MemoryMember
from opie.raid5.phases import PhaseKind, PhaseState
from opie.raid5.recovery import replace
from opie.raid5.scrub import scrub
from opie.raid5.superblock import MemberState, Superblock
from opie.raid5.testing import FaultyMember, PowerCut, rig

CHUNK = 16384
STRIPES = 40


async def degraded():
    r = rig(4, stripes=STRIPES, chunk_size=CHUNK, volatile=True)
    arr = await r.create(region_stripes=4)
    ref = bytearray(os.urandom(arr.size))
    await arr.write(0, bytes(ref), fua=True)
    r.disks[1].failed = True
    await arr.fail(1)
    return r, arr, ref


def test_rebuild_in_background_with_io_and_rate_limit():
    async def go():
        r, arr, ref = await degraded()
        slept = []
        now = [0.0]
        gate = asyncio.Event()

        async def sleep(seconds):
            slept.append(seconds)
            now[0] += seconds
            await gate.wait()
            gate.clear()

        new = FaultyMember(MemoryMember(r.disks[1].size, "spare"), r.cut)
        rate = 1 << 20
        task = await replace(arr, new, rate=rate, checkpoint_every=8, sleep=sleep,
                             clock=lambda: now[0])
        rng = random.Random(5)
        seen_progress = set()
        while not task.done():
            await asyncio.sleep(0)
            phase = arr.phases[PhaseKind.REBUILD]
            seen_progress.add(phase.done)
            at = rng.randrange(arr.size - 20000)
            d = os.urandom(rng.randrange(1, 20000))
            await arr.write(at, d)                  # I/O continues during the rebuild
            ref[at:at + len(d)] = d
            assert await arr.read(at, len(d)) == d
            gate.set()
        await task
        phase = arr.phases[PhaseKind.REBUILD]
        assert phase.state is PhaseState.DONE and phase.done == STRIPES
        assert len(seen_progress) > 10, "progress is visible while it runs"
        assert arr.state_string() == "UUUU"
        # with a clock that only sleeping advances, it waits exactly bytes moved / rate
        assert len(slept) == STRIPES
        assert sum(slept) == pytest.approx(STRIPES * 4 * CHUNK / rate)
        assert await arr.read(0, arr.size) == bytes(ref)
        rep = await scrub(arr)
        assert (rep.repaired, rep.unrecoverable, rep.mismatches) == (0, 0, 0)
        # and the old members are not needed for the rebuilt role
        r.disks[2].failed = True
        assert await arr.read(0, arr.size) == bytes(ref)
    asyncio.run(go())


def test_rebuild_resumes_from_checkpoint_after_crash():
    async def go():
        r, arr, ref = await degraded()
        new = FaultyMember(MemoryMember(r.disks[1].size, "spare", volatile=True), r.cut)
        task = await replace(arr, new, checkpoint_every=8)
        # let it run for a while, then pull the power in the middle of a stripe copy
        while arr.phases[PhaseKind.REBUILD].done < 21:
            await asyncio.sleep(0)
        r.cut.arm(1)
        with pytest.raises(PowerCut):
            await task
        for m in r.mems + [new.inner]:
            m.power_loss(random.Random(2))
        r.cut.budget, r.cut.fired = None, False
        sb = Superblock.from_bytes(await new.inner.read(0, 4096))
        assert sb.role_states[1] is MemberState.REBUILDING and sb.recovery_stripe in (16, 24)
        arr2 = await assemble([r.disks[3], new, r.disks[0], r.disks[2]])
        phase = arr2.phases[PhaseKind.REBUILD]
        assert phase.state is PhaseState.IDLE and phase.done == sb.recovery_stripe > 0
        await arr2.wait_idle()
        assert arr2.state_string() == "UUUU"
        assert phase.state is PhaseState.DONE
        assert await arr2.read(0, arr2.size) == bytes(ref)
        r.disks[0].failed = True       # the rebuilt member carries its share
        assert await arr2.read(0, arr2.size) == bytes(ref)
    asyncio.run(go())


def test_replacement_failing_leaves_array_degraded():
    async def go():
        r, arr, ref = await degraded()
        new = FaultyMember(MemoryMember(r.disks[1].size, "spare"), None)
        task = await replace(arr, new, checkpoint_every=8)
        while arr.phases[PhaseKind.REBUILD].done < 5:
            await asyncio.sleep(0)
        new.failed = True
        await task
        assert arr.phases[PhaseKind.REBUILD].state is PhaseState.FAILED
        assert arr.state_string() == "U_UU" and arr.failed is None
        assert await arr.read(0, arr.size) == bytes(ref)
    asyncio.run(go())
