"""Property test: the pool against a reference model, with crashes.

The model keeps, per volume, what reads must return now (`volatile`), what
must survive a crash (`durable`) and, for bytes written since they were last
made durable, the values a crash may leave instead; snapshots are frozen
copies. Random writes (some FUA), trims, reads, flushes, snapshot creates and
deletes run against both; a crash keeps a random subset of the unflushed
device writes and reopens the pool. After every crash and at the end: every
read equals the model, every durable byte is back, snapshots read their
frozen contents, and `check()` finds no leaked or double-owned segment.
"""

from __future__ import annotations

import asyncio
import errno
import random

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opie.head.volumes import CrashDevice, Pool

SEG = 8192
SIZES = {"v0": 64 * 1024, "v1": 45 * 1024 + 512}   # v1 ends inside a segment
DEVICE = 1 << 20


class VolumeModel:
    def __init__(self, size: int) -> None:
        self.volatile = np.zeros(size, dtype=np.uint8)
        self.durable = np.zeros(size, dtype=np.uint8)
        # (mask, values): bytes a crash may show instead of `durable`
        self.maybe: list[tuple[np.ndarray, np.ndarray]] = []
        self.snaps: dict[str, bytes] = {}

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        end = offset + len(data)
        self.volatile[offset:end] = np.frombuffer(data, dtype=np.uint8)
        if fua:
            self.durable[offset:end] = self.volatile[offset:end]
            for mask, _ in self.maybe:
                mask[offset:end] = False
        else:
            mask = np.zeros(len(self.volatile), dtype=bool)
            mask[offset:end] = True
            self.maybe.append((mask, self.volatile.copy()))

    def settle(self) -> None:
        self.durable[:] = self.volatile
        self.maybe.clear()

    def survived(self, got: bytes) -> bool:
        actual = np.frombuffer(got, dtype=np.uint8)
        ok = actual == self.durable
        for mask, values in self.maybe:
            ok |= mask & (actual == values)
        return bool(ok.all())

    def adopt(self, got: bytes) -> None:
        self.volatile[:] = np.frombuffer(got, dtype=np.uint8)
        self.settle()


def extent(size: int):
    return st.integers(0, size - 1).flatmap(
        lambda off: st.tuples(st.just(off), st.integers(1, min(size - off, 3 * SEG))))


def io_op(kind: str, vol: str):
    return extent(SIZES[vol]).map(lambda e: (kind, vol, e[0], e[1]))


OPS = st.one_of(
    *[st.tuples(io_op("write", v), st.booleans(), st.integers(0, 2**31))
      .map(lambda t: t[0] + (t[1], t[2])) for v in SIZES],
    *[io_op("read", v) for v in SIZES],
    *[io_op("trim", v) for v in SIZES],
    st.tuples(st.just("flush"), st.sampled_from(sorted(SIZES))),
    st.tuples(st.just("snap"), st.sampled_from(sorted(SIZES))),
    st.tuples(st.just("delsnap"), st.sampled_from(sorted(SIZES)), st.integers(0, 7)),
    st.tuples(st.just("crash"), st.integers(0, 2**31)),
)


async def run(ops: list[tuple]) -> None:
    dev = CrashDevice(DEVICE)
    pool = await Pool.format(dev, segment_size=SEG, max_entries=62, journal_blocks=12)
    models = {}
    for name, size in SIZES.items():
        await pool.create_volume(name, size)
        models[name] = VolumeModel(size)
    counter = 0

    async def verify(strict_snapshots: bool = True) -> None:
        assert pool.check().problems == []
        for name, model in models.items():
            got = await pool.open_volume(name).read(0, SIZES[name])
            assert got == model.volatile.tobytes(), name
            listed = {s.name for s in pool.list_snapshots(name)}
            assert listed == set(model.snaps), name
            for snap, frozen in model.snaps.items():
                assert await pool.open_snapshot(name, snap).read(0, len(frozen)) == frozen

    for op in ops:
        kind = op[0]
        if kind == "write":
            _, vol, off, n, fua, seed = op
            data = random.Random(seed).randbytes(n)
            try:
                await pool.open_volume(vol).write(off, data, fua=fua)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                assert await pool.open_volume(vol).read(off, n) == \
                    models[vol].volatile[off:off + n].tobytes()
                continue
            models[vol].write(off, data, fua)
        elif kind == "trim":
            _, vol, off, n = op
            try:
                await pool.open_volume(vol).trim(off, n)
            except OSError as exc:   # zeroing a shared partial segment needs space
                assert exc.errno == errno.ENOSPC
                continue
            models[vol].write(off, bytes(n), False)
        elif kind == "read":
            _, vol, off, n = op
            got = await pool.open_volume(vol).read(off, n)
            assert got == models[vol].volatile[off:off + n].tobytes()
        elif kind == "flush":
            await pool.open_volume(op[1]).flush()
            models[op[1]].settle()
        elif kind == "snap":
            counter += 1
            await pool.create_snapshot(op[1], f"s{counter}")
            models[op[1]].snaps[f"s{counter}"] = models[op[1]].volatile.tobytes()
            models[op[1]].settle()
        elif kind == "delsnap":
            names = sorted(models[op[1]].snaps)
            if names:
                victim = names[op[2] % len(names)]
                await pool.delete_snapshot(op[1], victim)
                del models[op[1]].snaps[victim]
        elif kind == "crash":
            rng = random.Random(op[1])
            image = dev.crash_image(rng, keep=rng.choice((0.0, 0.5, 1.0)), tear=False)
            dev = CrashDevice(DEVICE, image)
            pool = await Pool.open(dev)
            for name, model in models.items():
                got = await pool.open_volume(name).read(0, SIZES[name])
                assert model.survived(got), f"{name}: a durable byte was lost"
                model.adopt(got)
            await verify()
    await verify()
    await pool.close()
    reopened = await Pool.open(dev)
    assert reopened.check().problems == []
    for name, model in models.items():
        assert await reopened.open_volume(name).read(0, SIZES[name]) == model.volatile.tobytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=10, max_size=80))
def test_pool_matches_reference_model_across_crashes(ops: list[tuple]) -> None:
    asyncio.run(run(ops))
