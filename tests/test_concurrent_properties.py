"""Concurrent property test: volumes and snapshots on RAID5, everything at once.

Hypothesis drives a state machine over the real stack below the NBD export
(opie.head.volumes Pool on an opie.raid5 Array of volatile in-memory
members, see concurrency_support). Rules *start* operations as tasks and
leave them in flight: writes, FUA writes, flushes, reads, snapshot create and
delete, volume create, delete, grow and shrink; others cancel an operation in
flight, let the loop run, lose a member or bring it back (resync in the
background), or cut the power (now, or after a number of member writes,
tearing the one in flight) and then reassemble the array and reopen the pool.
Each member I/O waits a seeded number of loop turns, so the interleaving is
random per example and identical when replayed.

After every step: every view read back holds, block by block, only its own
volume's blocks at their own place (every write's blocks name volume
incarnation, write id and block), each either the old or a new value as the
model allows (no "any bytes" for unacknowledged ranges); reads of deleted
views fail with ENODEV; a scrub of the pool's stripes finds nothing to
repair. After a power cut: every acknowledged-durable block (FUA, or covered
by an acknowledged flush) reads back, everything else is old or new block by
block, the pool passes fsck and volumes and snapshots exist as they did
(or as the management call in flight left them: before or after).

Size: OPIE_PROPERTY_EXAMPLES examples (default 200) of OPIE_PROPERTY_STEPS
steps (default 30); derandomized and without the example database, so a run
is reproducible.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import traceback
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from concurrency_support import (BLOCK, ZERO, Layout, ReadWatch, Stack, View, decode_all,
                                 pattern, quiet, turns_until_done)
from opie.head.volumes.errors import ValidationError
from opie.raid5 import checksums
from opie.raid5.recovery import re_add
from opie.raid5.superblock import MemberState

LAYOUT = Layout()
SEG_BLOCKS = LAYOUT.segment // BLOCK
NAMES = ("v0", "v1", "v2")
CHECK_TURNS = 200_000       # loop turns a check or an operation may take before it is a hang


@dataclass
class Op:
    """An operation in flight; `cancelled` once the machine cancelled it."""

    kind: str
    view: View | None
    task: asyncio.Task
    cancelled: bool = False


class ConcurrentStack(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.ops: list[Op] = []
        self.mgmt: Op | None = None
        self.pending: dict = {}          # what the management call in flight may leave
        self.volumes: dict[str, View] = {}
        self.snaps: dict[tuple[str, str], View] = {}
        self.ghosts: list[View] = []     # deleted views: reads must fail with ENODEV
        self.failures: list[str] = []
        self.crashing = False
        self.next_vol = 0
        self.next_wid = 0
        self.next_snap = 0
        self.stack: Stack | None = None
        self.saved_cache = checksums.MAX_CACHED

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        checksums.MAX_CACHED = self.saved_cache
        tasks = [op.task for op in self.ops] + ([self.mgmt.task] if self.mgmt else [])
        if self.stack is not None and self.stack.arr is not None:
            tasks += list(self.stack.arr.tasks)
        for t in tasks:
            t.cancel()

        async def ended() -> None:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.run(ended())
        self.loop.close()
        if self.stack is not None:
            self.stack.release()

    # -- setup ----------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**32 - 1), segs=st.integers(1, 4), cut=st.integers(0, 31))
    def setup(self, seed, segs, cut):
        # a checksum cache smaller than the working set, as on a large array
        checksums.MAX_CACHED = 1
        self.stack = Stack(LAYOUT, random.Random(seed))
        self.run(self.stack.build())
        with quiet():
            self.run(self.stack.pool.create_volume("v0", (segs * SEG_BLOCKS - cut) * BLOCK))
        self.volumes["v0"] = self.new_view("v0", segs * SEG_BLOCKS - cut)

    def new_view(self, name: str, blocks: int) -> View:
        self.next_vol += 1
        return View(name, self.next_vol, [{ZERO} for _ in range(blocks)],
                    self.stack.pool.open_volume(name), snapshot=False)

    # -- helpers ----------------------------------------------------------------
    def live_volumes(self) -> list[View]:
        return [self.volumes[n] for n in sorted(self.volumes)]

    def readable(self) -> list[View]:
        return self.live_volumes() + [self.snaps[k] for k in sorted(self.snaps)]

    def idle_mgmt(self) -> bool:
        return self.mgmt is None or self.mgmt.task.done()

    def start(self, kind: str, view: View | None, coro) -> Op:
        op = Op(kind, view, self.loop.create_task(coro))
        self.ops.append(op)
        return op

    def fail(self, message: str) -> None:
        if not self.crashing:
            self.failures.append(message)

    def expected(self, exc: BaseException, op_kind: str, view: View | None,
                 allowed: tuple[int, ...] = ()) -> bool:
        """Is `exc` an outcome the contract allows here? Records it if not."""
        if self.crashing or isinstance(exc, asyncio.CancelledError):
            return True
        if isinstance(exc, OSError) and exc.errno in allowed:
            return True
        if isinstance(exc, OSError) and view is not None:
            if exc.errno == errno.ENODEV and view.state != "live":
                return True
            if exc.errno == errno.EINVAL and view.resizing:
                return True
        where = traceback.extract_tb(exc.__traceback__)[-1]
        self.fail(f"{op_kind} on {view.name if view else '-'}: {type(exc).__name__}: {exc} "
                  f"(at {os.path.basename(where.filename)}:{where.lineno} {where.line})")
        return False

    # -- I/O --------------------------------------------------------------------
    async def do_write(self, view: View, lo: int, hi: int, fua: bool) -> None:
        self.next_wid += 1
        wid = self.next_wid
        view.write_started(wid, lo, hi)
        resizes = view.resizes
        try:
            await view.handle.write(lo * BLOCK, pattern(view.vol, wid, lo, hi - lo), fua=fua)
        except BaseException as exc:
            nospace = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            if isinstance(exc, OSError) and exc.errno == errno.EINVAL and resizes != view.resizes:
                nospace = True          # refused: the volume shrank under it
            self.expected(exc, "write", view, (errno.ENOSPC,))
            view.write_ended(wid, "nospace" if nospace else "failed")
        else:
            view.write_ended(wid, "fua" if fua else "acked")

    @precondition(lambda self: self.volumes)
    @rule(data=st.data(), fua=st.booleans())
    def write(self, data, fua):
        views = [v for v in self.live_volumes() if v.state == "live" and v.blocks]
        if not views:
            return
        view = data.draw(st.sampled_from(views), label="volume")
        lo = data.draw(st.integers(0, view.blocks - 1), label="block")
        n = data.draw(st.integers(1, min(2 * SEG_BLOCKS + 8, view.blocks - lo)), label="blocks")
        if view.overlaps_write(lo, lo + n):
            return                       # overlapping writes in flight have no defined order
        self.start("write", view, self.do_write(view, lo, lo + n, fua))

    async def do_read(self, watch: ReadWatch) -> None:
        """`watch` is taken when the read is issued, as a request arrives, not
        when its task first runs: a resize may end in between, and a read
        issued before a shrink ended may still be refused (EINVAL)."""
        view, lo, hi = watch.view, watch.lo, watch.hi
        try:
            got = await view.handle.read(lo * BLOCK, (hi - lo) * BLOCK)
        except BaseException as exc:
            if not (isinstance(exc, OSError) and watch.may_fail(exc)):
                self.expected(exc, "read", view)
            return
        try:
            watch.check(got)
        except AssertionError as exc:
            self.fail(f"read {view.name} [{lo}, {hi}): {exc}")

    @precondition(lambda self: self.volumes)
    @rule(data=st.data())
    def read(self, data):
        views = [v for v in self.readable() if v.state != "deleted" and v.blocks]
        if not views:
            return
        view = data.draw(st.sampled_from(views), label="view")
        lo = data.draw(st.integers(0, view.blocks - 1), label="block")
        n = data.draw(st.integers(1, view.blocks - lo), label="blocks")
        self.start("read", view, self.do_read(view.watch(lo, lo + n)))

    async def do_flush(self, view: View) -> None:
        frozen = view.freeze()
        try:
            await view.handle.flush()
        except BaseException as exc:
            self.expected(exc, "flush", view)
        else:
            view.flushed(frozen)

    @precondition(lambda self: self.volumes)
    @rule(data=st.data())
    def flush(self, data):
        view = data.draw(st.sampled_from(self.live_volumes()), label="volume")
        self.start("flush", view, self.do_flush(view))

    @precondition(lambda self: any(not op.task.done() for op in self.ops))
    @rule(data=st.data())
    def cancel(self, data):
        """A closing NBD session cancels its requests in flight."""
        op = data.draw(st.sampled_from([op for op in self.ops if not op.task.done()]), label="op")
        op.cancelled = True
        op.task.cancel()

    @rule(turns=st.integers(1, 300))
    def advance(self, turns):
        async def spin() -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
        self.run(spin())

    # -- management (one call at a time, like the API's jobs) ----------------------
    def manage(self, kind: str, view: View | None, coro, **pending) -> None:
        self.pending = dict(kind=kind, **pending)
        self.mgmt = Op(kind, view, self.loop.create_task(coro))

    async def do_create_volume(self, name: str, blocks: int) -> None:
        try:
            await self.stack.pool.create_volume(name, blocks * BLOCK)
        except BaseException as exc:
            if not isinstance(exc, ValidationError):
                self.expected(exc, "create volume", None)
            return
        self.volumes[name] = self.new_view(name, blocks)

    @precondition(lambda self: self.idle_mgmt() and len(self.volumes) < len(NAMES))
    @rule(data=st.data(), segs=st.integers(1, 4), cut=st.integers(0, 31))
    def create_volume(self, data, segs, cut):
        name = data.draw(st.sampled_from([n for n in NAMES if n not in self.volumes]))
        self.manage("create volume", None, self.do_create_volume(name, segs * SEG_BLOCKS - cut),
                    name=name, blocks=segs * SEG_BLOCKS - cut)

    async def do_delete_volume(self, view: View) -> None:
        victims = [view] + [s for (v, _), s in self.snaps.items() if v == view.name]
        for v in victims:
            v.state = "deleting"
        try:
            await self.stack.pool.delete_volume(view.name, recursive=True)
        except BaseException as exc:
            self.expected(exc, "delete volume", view)
            return
        del self.volumes[view.name]
        for v in victims:
            v.state = "deleted"
            self.ghosts.append(v)
        for key in [k for k in self.snaps if k[0] == view.name]:
            del self.snaps[key]

    @precondition(lambda self: self.idle_mgmt() and self.volumes)
    @rule(data=st.data())
    def delete_volume(self, data):
        view = data.draw(st.sampled_from(self.live_volumes()), label="volume")
        self.manage("delete volume", view, self.do_delete_volume(view))

    async def do_resize(self, view: View, blocks: int) -> None:
        if blocks < view.blocks:
            view.shrinking(blocks)
        else:
            view.resizes += 1
            view.resizing = True
            view.sizes.add(blocks)
        try:
            await self.stack.pool.resize_volume(view.name, blocks * BLOCK)
        except BaseException as exc:
            if self.crashing:
                return                  # a power cut leaves the old size or the new one
            self.expected(exc, "resize", view, (errno.ENOSPC,))
            view.resizing = False
            view.sizes = {view.blocks}
            return
        view.resized(blocks)

    @precondition(lambda self: self.idle_mgmt() and self.volumes)
    @rule(data=st.data(), segs=st.integers(1, 4), cut=st.integers(0, 31))
    def resize_volume(self, data, segs, cut):
        view = data.draw(st.sampled_from(self.live_volumes()), label="volume")
        self.manage("resize", view, self.do_resize(view, segs * SEG_BLOCKS - cut))

    async def do_snapshot(self, view: View, name: str) -> None:
        frozen = view.freeze()
        self.pending["frozen"] = frozen
        self.pending["blocks"] = view.blocks
        try:
            await self.stack.pool.create_snapshot(view.name, name)
        except BaseException as exc:
            if not isinstance(exc, ValidationError):
                self.expected(exc, "snapshot", view)
            return
        blocks = [frozen.candidates(b) for b in range(self.pending["blocks"])]
        self.snaps[(view.name, name)] = View(f"{view.name}@{name}", view.vol, blocks,
                                             self.stack.pool.open_snapshot(view.name, name),
                                             snapshot=True)

    @precondition(lambda self: self.idle_mgmt() and self.volumes and len(self.snaps) < 4)
    @rule(data=st.data())
    def create_snapshot(self, data):
        view = data.draw(st.sampled_from(self.live_volumes()), label="volume")
        self.next_snap += 1
        name = f"s{self.next_snap}"
        self.manage("snapshot", view, self.do_snapshot(view, name), volume=view.name, name=name)

    async def do_delete_snapshot(self, key: tuple[str, str]) -> None:
        view = self.snaps[key]
        view.state = "deleting"
        try:
            await self.stack.pool.delete_snapshot(*key)
        except BaseException as exc:
            self.expected(exc, "delete snapshot", view)
            return
        view.state = "deleted"
        del self.snaps[key]
        self.ghosts.append(view)

    @precondition(lambda self: self.idle_mgmt() and self.snaps)
    @rule(data=st.data())
    def delete_snapshot(self, data):
        key = data.draw(st.sampled_from(sorted(self.snaps)), label="snapshot")
        self.manage("delete snapshot", self.snaps[key], self.do_delete_snapshot(key))

    # -- members ------------------------------------------------------------------
    def faulty_role(self) -> int | None:
        arr = self.stack.arr
        roles = [s.role for s in arr.slots if s.state is MemberState.FAULTY]
        return roles[0] if roles else None

    @precondition(lambda self: self.stack is not None and self.stack.healthy())
    @rule(role=st.integers(0, LAYOUT.members - 1), noticed=st.booleans())
    def lose_member(self, role, noticed):
        """An ISU goes away (noticed at once, or at the next I/O to it)."""
        self.stack.disks[role].failed = True
        if noticed:
            self.run(self.stack.arr.fail(role))

    @precondition(lambda self: self.stack is not None and self.faulty_role() is not None
                  and not self.stack.arr.tasks and not self.stack.arr.failed)
    @rule()
    def member_returns(self):
        """It comes back: re-added, what it missed resyncs in the background."""
        role = self.faulty_role()
        self.stack.disks[role].failed = False
        self.run(re_add(self.stack.arr, self.stack.members[role]))

    # -- power cuts ---------------------------------------------------------------
    @rule(armed=st.booleans(), writes=st.integers(0, 40), turns=st.integers(0, 400),
          keep=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**32 - 1))
    def power_cut(self, armed, writes, turns, keep, seed):
        stack = self.stack
        self.crashing = True
        if armed:   # let `writes` more member writes through, tear the next one
            stack.cut.arm(writes)
            stack.cut.rng = random.Random(seed)

            async def until_cut() -> None:
                for _ in range(turns):
                    if stack.cut.fired:
                        return
                    await asyncio.sleep(0)
            self.run(until_cut())
        tasks = [op.task for op in self.ops] + ([self.mgmt.task] if self.mgmt else [])
        self.run(stack.power_cut(tasks, keep))
        self.ops, self.mgmt, self.ghosts = [], None, []
        self.run(stack.restart())
        self.crashing = False
        self.reconcile()
        self.pending = {}

    def reconcile(self) -> None:
        """Compare the reopened pool with the model; the model adopts what is there."""
        pool = self.stack.pool
        pending = self.pending
        kind = pending.get("kind")
        assert pool.check().problems == [], pool.check().problems
        found = {info.name: info.size // BLOCK for info in pool.list_volumes()}
        volumes: dict[str, View] = {}
        for name, view in self.volumes.items():
            if name not in found:
                assert view.state == "deleting", f"volume {name} lost in a power cut"
                continue
            volumes[name] = view
        for name, blocks in found.items():
            if name in volumes:
                continue
            assert kind == "create volume" and pending["name"] == name, f"volume {name} appeared"
            assert blocks == pending["blocks"], (name, blocks, pending["blocks"])
            volumes[name] = self.new_view(name, blocks)
        for name, view in volumes.items():
            blocks = found[name]
            assert blocks in view.sizes, f"{name}: {blocks} blocks, expected one of {view.sizes}"
            handle = pool.open_volume(name)
            got = decode_all(view, self.run_quiet(handle.read(0, blocks * BLOCK)))
            self.check_durable(view, got)
            view.restarted(got, handle)
        self.volumes = volumes
        found_snaps = {(s.volume, s.name): s.size // BLOCK for s in pool.list_snapshots()}
        snaps: dict[tuple[str, str], View] = {}
        for key, view in self.snaps.items():
            if key not in found_snaps:
                assert view.state == "deleting", f"snapshot {key} lost in a power cut"
                continue
            snaps[key] = view
        for key in found_snaps:
            if key in snaps:
                continue
            assert kind == "snapshot" and (pending["volume"], pending["name"]) == key, (
                f"snapshot {key} appeared")
            frozen = pending["frozen"]
            snaps[key] = View(f"{key[0]}@{key[1]}", frozen.view.vol,
                              [frozen.candidates(b) for b in range(pending["blocks"])],
                              None, snapshot=True)
        for key, view in snaps.items():
            handle = pool.open_snapshot(*key)
            assert found_snaps[key] == view.blocks, (key, found_snaps[key], view.blocks)
            got = decode_all(view, self.run_quiet(handle.read(0, view.blocks * BLOCK)))
            self.check_durable(view, got)
            view.restarted(got, handle)
        self.snaps = snaps

    @staticmethod
    def check_durable(view: View, got: list[int]) -> None:
        for b, wid in enumerate(got):
            allowed = view.dur[b] if b < len(view.dur) else {ZERO}
            assert wid in allowed, (f"after a power cut {view.name} block {b} holds write "
                                    f"{wid}, expected one of {sorted(allowed)}")

    def run_quiet(self, coro):
        with quiet():
            task = self.loop.create_task(coro)
        self.run(turns_until_done([task], CHECK_TURNS, "a check read"))
        return task.result()

    # -- after every step -----------------------------------------------------------
    @invariant()
    def views_read_back(self):
        if self.stack is None:
            return
        assert not self.failures, self.failures
        views = [v for v in self.readable() if v.state != "deleted" and v.blocks]
        with quiet():
            tasks = [self.loop.create_task(self.do_read(v.watch(0, v.blocks))) for v in views]
            tasks += [self.loop.create_task(self.ghost_read(v)) for v in self.ghosts]
        self.run(turns_until_done(tasks, CHECK_TURNS, "reading every view"))
        assert not self.failures, self.failures
        self.ops = [op for op in self.ops if not op.task.done()]

    async def ghost_read(self, view: View) -> None:
        try:
            await view.handle.read(0, BLOCK)
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                self.fail(f"read of deleted {view.name}: {exc}")
        else:
            self.fail(f"read of deleted {view.name} succeeded")

    @invariant()
    def scrub_finds_nothing(self):
        stack = self.stack
        if stack is None or not stack.healthy():
            return
        with quiet():
            task = self.loop.create_task(stack.scrub())
        self.run(turns_until_done([task], CHECK_TURNS, "scrub"))
        report = task.result()
        assert (report.mismatches, report.unrecoverable, report.repaired) == (0, 0, 0), (
            report.summary(), report.bad)


EXAMPLES = int(os.environ.get("OPIE_PROPERTY_EXAMPLES", "200"))
STEPS = int(os.environ.get("OPIE_PROPERTY_STEPS", "30"))
ConcurrentStack.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=True,
    database=None, phases=[Phase.generate, Phase.shrink], suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])
TestConcurrentStack = ConcurrentStack.TestCase
