"""The heads' election against a real 3-member etcd cluster with TLS.

Proves: of two candidates exactly one is active and the other passive knows
its name; a resignation hands over with a larger epoch; losing one etcd member
changes nothing; losing quorum makes the active run on_demote before its lease
can expire, and a campaign wins again once quorum is back; the daemon's
demote() releases the key to the peer; the deadline follows the injected clock.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import pytest

from opie.discovery.errors import CoordError
from opie.head.ha.election import Election, Role
from tests.etcd_support import etcd_lab  # noqa: F401  (fixture)

TTL = 2
WAIT = 10.0     # bound for every awaited change
pytestmark = pytest.mark.timeout(90)   # a hang shows its stacks instead of eating the run


@dataclass
class Candidate:
    """An Election with the callbacks a daemon would give, recording what ran when."""
    election: Election
    demoted: list[tuple[float, str, float | None]] = field(default_factory=list)  # (at, reason, expiry)
    elected: list[int] = field(default_factory=list)


def candidate(lab, name: str, clock=time.monotonic) -> Candidate:
    c: Candidate

    async def on_demote(reason: str) -> None:
        c.demoted.append((clock(), reason, c.election.lease_expires_at))

    async def on_elected(epoch: int) -> None:
        c.elected.append(epoch)

    c = Candidate(Election(lab.coord(timeout=0.5), name, on_demote, on_elected=on_elected, ttl=TTL,
                           info={"api": f"https://{name}:8443"}, clock=clock))
    return c


async def first_active(cands: list[Candidate], timeout: float = WAIT) -> Candidate:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = [c for c in cands if c.election.role is Role.ACTIVE]
        if active:
            return active[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no active head after {timeout}s: {[c.election.status() for c in cands]}")


async def until(predicate, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not met after {timeout}s"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def two_heads(lab):
    """head-a and head-b campaigning; yields (active, passive) once one won.
    Both leave the election at the end, and etcd is healed for the next test."""
    cands = [candidate(lab, n) for n in ("head-a", "head-b")]
    try:
        for c in cands:
            await c.election.start()
        active = await first_active(cands)
        yield active, next(c for c in cands if c is not active)
    finally:
        for c in cands:
            await c.election.stop()
        await asyncio.to_thread(lab.heal)


def test_two_candidates_one_active_one_passive(etcd_lab):
    async def run():
        async with two_heads(etcd_lab) as (active, passive):
            assert await passive.election.wait_leader(WAIT) == active.election.name
            assert passive.election.role is Role.PASSIVE
            await until(lambda: active.elected)     # on_elected runs after the role is set
            assert active.election.epoch == passive.election.epoch == active.elected[0]
            assert 0 < active.election.lease_left() <= TTL
            heads = {kv.key: json.loads(kv.value) for kv in etcd_lab.coord().get_prefix("heads/")}
            assert heads[f"heads/{active.election.name}"]["role"] == "active"
            assert heads[f"heads/{passive.election.name}"]["role"] == "passive"
            leader = json.loads(etcd_lab.coord().get("leader").value)
            assert leader == {"name": active.election.name, "api": f"https://{active.election.name}:8443"}
            assert [c for c in (active, passive) if c.election.role is Role.ACTIVE] == [active]
        assert etcd_lab.coord().get("leader") is None           # released on stop
        assert etcd_lab.coord().get_prefix("heads/") == []      # registrations gone with the leases
    asyncio.run(run())


def test_resign_hands_over_with_a_larger_epoch(etcd_lab):
    async def run():
        async with two_heads(etcd_lab) as (old, new):
            old_epoch = old.election.epoch
            await old.election.resign()
            assert [r for _, r, _ in old.demoted] == ["resigned"]
            assert await new.election.wait_role(Role.ACTIVE, WAIT)
            assert new.election.epoch > old_epoch
            await until(lambda: new.elected)
            assert int(etcd_lab.coord().get("epoch").value) == new.election.epoch
            # a campaign turn that read the old key before it was released may show it for one
            # turn; the watch then sees the delete: wait for the new leader, bounded
            await until(lambda: old.election.leader == new.election.name)
            assert old.election.role is Role.PASSIVE and old.election.epoch == new.election.epoch
    asyncio.run(run())


def test_one_etcd_member_lost_changes_nothing(etcd_lab):
    async def run():
        async with two_heads(etcd_lab) as (active, passive):
            epoch = active.election.epoch
            await until(lambda: active.elected)
            victim = await asyncio.to_thread(etcd_lab.cluster.leader)
            assert victim is not None
            await asyncio.to_thread(victim.kill)    # the raft leader: the harder case
            await asyncio.sleep(3 * TTL)            # a window of 3 leases: nothing may happen in it
            assert active.election.role is Role.ACTIVE and active.election.epoch == epoch
            assert active.demoted == [] and active.elected == [epoch]
            assert passive.election.role is Role.PASSIVE and passive.elected == []
    asyncio.run(run())


def test_quorum_lost_demotes_before_expiry_and_campaign_works_after(etcd_lab):
    async def run():
        async with two_heads(etcd_lab) as (active, passive):
            old_epoch = active.election.epoch
            await until(lambda: active.elected)
            paused = etcd_lab.cluster.members[:2]
            for m in paused:
                await asyncio.to_thread(etcd_lab.pause, m)
            assert await active.election.wait_role(Role.PASSIVE, TTL + 1.0)
            [(at, reason, expiry)] = active.demoted
            assert reason == "lease not renewed in time"
            assert expiry is not None and at < expiry, f"on_demote at {at}, lease could expire at {expiry}"
            assert expiry - at >= active.election.margin - 0.1
            assert passive.elected == []            # nobody can win without quorum
            for m in paused:
                etcd_lab.resume(m)
            await asyncio.to_thread(etcd_lab.cluster.wait_healthy, WAIT)
            winner = await first_active([active, passive], timeout=3 * TTL + WAIT)
            assert winner.election.epoch > old_epoch
            loser = passive if winner is active else active
            # the loser may still show its own old key (read before its lease expired) for one
            # watch turn: wait, bounded, for the winner's name
            await until(lambda: loser.election.leader == winner.election.name)
            assert loser.election.role is Role.PASSIVE
    asyncio.run(run())


def test_daemon_demote_hands_over_and_holds_back(etcd_lab):
    async def run():
        async with two_heads(etcd_lab) as (old, new):
            await old.election.demote("2 of 5 members reachable", hold=30.0)
            assert [r for _, r, _ in old.demoted] == ["2 of 5 members reachable"]
            assert await new.election.wait_role(Role.ACTIVE, WAIT)
            await new.election.resign(hold=30.0)   # nobody campaigns now: both hold back
            assert await old.election.wait_role(Role.ACTIVE, 1.0) is False
            assert etcd_lab.coord().get("leader") is None
    asyncio.run(run())


def test_deadline_follows_the_injected_clock(etcd_lab):
    """Time jumps past the deadline between two renewals (a stalled process
    seen from its own clock): the watchdog demotes at once."""
    now = [1000.0]
    async def run():
        c = candidate(etcd_lab, "head-c", clock=lambda: now[0])
        await c.election.start()
        try:
            assert await c.election.wait_role(Role.ACTIVE, WAIT)
            assert c.election.lease_left() > c.election.margin
            now[0] += TTL
            assert await c.election.wait_role(Role.PASSIVE, 1.0)
            assert [r for _, r, _ in c.demoted] == ["lease not renewed in time"]
        finally:
            await c.election.stop()
    asyncio.run(run())


def test_stop_ends_a_loop_whose_cancellation_was_swallowed(etcd_lab):
    """On Python 3.11 asyncio.wait_for can swallow a cancellation that arrives
    just as its inner call completes (the election's calls all go through it).
    Seen in CI: a passive head's campaign loop outlived stop(), stop() never
    returned, and the loop went on campaigning. Here the passive's first
    cancelled call swallows its cancellation the same way; stop() must still
    end every task within its bound and leave no leader key of its own."""
    async def run():
        async with two_heads(etcd_lab) as (active, passive):
            election = passive.election
            real_call = election._call
            swallowed: list[str] = []

            parked = asyncio.Event()

            async def call(fn, *args, **kwargs):
                try:
                    if getattr(fn, "__name__", "") == "watch" and not swallowed:
                        parked.set()                     # the campaign loop waits here ...
                        await asyncio.Event().wait()     # ... until stop() cancels it
                    return await real_call(fn, *args, **kwargs)
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed.append(getattr(fn, "__name__", str(fn)))
                    asyncio.current_task().uncancel()          # what the wait_for race leaves
                    raise CoordError("call ended as the task was cancelled") from None

            election._call = call
            await asyncio.wait_for(parked.wait(), WAIT)
            await asyncio.wait_for(election.stop(), 20)
            assert swallowed, "no cancellation reached a call: the test proved nothing"
            assert election.role is Role.STOPPED
            assert active.election.role is Role.ACTIVE
            assert json.loads(etcd_lab.coord().get("leader").value)["name"] == active.election.name
    asyncio.run(run())
