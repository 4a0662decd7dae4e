"""The heads' election: one active head, chosen by a leased key in etcd.

A head campaigns by creating `/opie/CLUSTER/leader` on its own lease (TTL <= 2 s)
in one transaction (create if create_revision == 0). The key's create revision
is the EPOCH: etcd revisions only grow, so every new active has a larger epoch
than every one before it, and the ISUs fence on it. The losing head is passive:
it knows the leader's name and epoch and waits (a bounded watch) for the key
to go, then campaigns.

Demotion before expiry: the lease's expiry is counted from when etcd handled a
keepalive, which is after we sent it; so `sent + ttl` is the earliest moment
etcd can expire the lease. The active demotes itself at `sent + ttl - margin`
of the last successful renewal (the watchdog, on the injectable clock): it
calls the daemon's async `on_demote(reason)` (stop shares, drop the service
address, close members), which must finish within `margin`. It also demotes
when the lease or the key is found gone, when the daemon calls `demote()`
(fewer than N-1 members reachable), and on `resign()` (switchover).

A head that demoted because it could not renew abandons that lease (it never
renews it again, and revokes it once etcd answers), so its old key expires and
a later campaign, its own or the peer's, can win. A head that demoted while
etcd answered releases the key after `on_demote` returned, and holds back from
campaigning for `hold` seconds so the peer wins.

The current epoch: the winner also raises `/opie/CLUSTER/epoch` (a plain
integer, never leased, never lowered) to its epoch, so an ISU that restarts
while no leader key exists still learns the highest epoch won.

Head registrations: `/opie/CLUSTER/heads/NAME` on the head's lease, a JSON
object with its name and role (and the daemon's `info`).

All methods are loop-only (asyncio); etcd calls run in threads, each bounded.
`on_demote` runs at most once per term as active, never concurrently with
another call of itself; `on_elected(epoch)` runs when this head wins.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opie.discovery.coord import Coord, KeyValue, Lease
from opie.discovery.errors import CoordError, LeaseExpired

log = logging.getLogger(__name__)

LEADER_KEY = "leader"
EPOCH_KEY = "epoch"          # the highest epoch ever won (not leased; only grows)
HEADS_PREFIX = "heads/"
DEFAULT_TTL = 2
DEFAULT_MARGIN = 0.6
WATCHDOG_TICK = 0.05
STOP_BOUND = 10.0   # seconds stop() waits for the election's tasks to end
HOLD_POLL = 0.5              # how often a head holding back looks for a new leader


class Role(enum.Enum):
    STOPPED = "stopped"
    PASSIVE = "passive"
    ACTIVE = "active"


class Election:
    """One head's part in the election (see the module docstring).

    `coord` is this head's etcd client; `name` its name (unique per cluster).
    `ttl` is the lease TTL asked for (etcd may grant its minimum, if larger);
    `margin` how long before the earliest expiry the active demotes;
    `renew_every` the keepalive period (default ttl / 5); `clock` a monotonic
    clock in seconds (injectable for tests)."""

    def __init__(self, coord: Coord, name: str, on_demote: Callable[[str], Awaitable[None]], *,
                 on_elected: Callable[[int], Awaitable[None]] | None = None,
                 ttl: int = DEFAULT_TTL, margin: float = DEFAULT_MARGIN, renew_every: float | None = None,
                 watch_timeout: float = 1.0, retry: float = 0.05, info: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < margin < ttl:
            raise ValueError(f"margin: expected between 0 and the TTL ({ttl}s), got {margin}")
        self.coord = coord
        self.name = name
        self.info = dict(info or {})
        self.ttl = ttl
        self.margin = margin
        self.renew_every = renew_every or ttl / 5
        self.watch_timeout = watch_timeout
        self.retry = retry
        self._on_demote = on_demote
        self._on_elected = on_elected
        self._clock = clock
        self._role = Role.STOPPED
        self._lease: Lease | None = None
        self._stale_leases: list[int] = []
        self._expires_at: float | None = None     # earliest expiry of the current lease
        self._epoch: int | None = None            # ours while active
        self._leader: KeyValue | None = None      # the leader key as last seen
        self._hold_until = 0.0
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []
        self._stopped = False                     # set by stop(): every loop ends at its next turn
        self.demotions: list[tuple[float, str]] = []  # (clock, reason), for status and tests

    # -- what the daemon and the status show ----------------------------------------

    @property
    def role(self) -> Role:
        return self._role

    @property
    def epoch(self) -> int | None:
        """This head's epoch while active; else the current leader's (None: no leader seen)."""
        if self._role is Role.ACTIVE:
            return self._epoch
        return self._leader.create_revision if self._leader else None

    @property
    def leader(self) -> str | None:
        """The active head's name (this head's, while active), None if there is none."""
        if self._role is Role.ACTIVE:
            return self.name
        if self._leader is None:
            return None
        try:
            name = str(json.loads(self._leader.value)["name"])
        except (ValueError, KeyError, TypeError):
            return None
        # not active, yet the key names this head: a key of ours about to expire or be
        # released (read just before it went), not a leader anyone may follow
        return None if name == self.name else name

    @property
    def lease_expires_at(self) -> float | None:
        """The earliest moment (on the clock) etcd may expire our current lease."""
        return self._expires_at

    def lease_left(self) -> float | None:
        """Seconds until the lease can expire, None without a lease."""
        if self._lease is None or self._expires_at is None:
            return None
        return max(0.0, self._expires_at - self._clock())

    def status(self) -> dict[str, Any]:
        left = self.lease_left()
        return {"name": self.name, "role": self._role.value, "epoch": self.epoch, "leader": self.leader,
                "lease_left": None if left is None else round(left, 3)}

    async def wait_role(self, role: Role, timeout: float) -> bool:
        """Wait (bounded) until this head has `role`; False on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._role is role), timeout)
            except asyncio.TimeoutError:
                return False
        return True

    async def wait_leader(self, timeout: float) -> str | None:
        """Wait (bounded) until a leader is known; its name, or None on timeout."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.leader is not None), timeout)
            except asyncio.TimeoutError:
                return None
        return self.leader

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Join the election as passive; campaigning starts at once."""
        if self._tasks:
            return
        self._stopped = False
        await self._set_role(Role.PASSIVE)
        self._tasks = [asyncio.create_task(self._keepalive_loop(), name=f"election-{self.name}-keepalive"),
                       asyncio.create_task(self._watchdog(), name=f"election-{self.name}-watchdog"),
                       asyncio.create_task(self._campaign_loop(), name=f"election-{self.name}-campaign")]

    async def stop(self) -> None:
        """Leave the election: demote if active (on_demote runs), release the
        key, revoke the lease (best effort, bounded), stop every task."""
        self._stopped = True
        await self._demote("stopping", release=True, hold=0.0)
        # A loop must not outlive stop(): on Python 3.11 asyncio.wait_for can swallow
        # a cancellation that arrives as its inner call completes, so the loops also
        # check _stopped, and the cancel is repeated (bounded) until every task ended.
        pending = set(self._tasks)
        deadline = asyncio.get_running_loop().time() + STOP_BOUND
        while pending and asyncio.get_running_loop().time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        if pending:
            log.error("%s: %d election task(s) did not stop within %ss", self.name, len(pending), STOP_BOUND)
        self._tasks = []
        if self._role is Role.ACTIVE:  # elected while stopping: step down again
            await self._demote("stopping", release=True, hold=0.0)
        lease, self._lease = self._lease, None
        for lease_id in ([lease.id] if lease else []) + self._stale_leases:
            try:
                await self._call(self.coord.revoke, lease_id)
            except CoordError as e:
                log.info("%s: lease %x not revoked (%s); it expires by itself", self.name, lease_id, e)
        self._stale_leases = []
        await self._set_role(Role.STOPPED)

    async def resign(self, hold: float | None = None) -> None:
        """Planned switchover: on_demote runs, then the key is released, and
        this head does not campaign for `hold` seconds (default 2 x TTL), so
        the passive wins. Call after the daemon drained and flushed."""
        await self._demote("resigned", release=True, hold=2 * self.ttl if hold is None else hold)

    async def demote(self, reason: str, hold: float | None = None) -> None:
        """Step down now (e.g. fewer than N-1 members reachable): on_demote
        runs, the key is released, no campaign for `hold` s (default 2 x TTL)."""
        await self._demote(reason, release=True, hold=2 * self.ttl if hold is None else hold)

    # -- internals -----------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, extra: float = 0.0, **kwargs: Any) -> Any:
        """Run a blocking coord call in a thread, bounded by the time the
        client can take to try every endpoint (plus `extra`)."""
        bound = self.coord.timeout * len(self.coord.endpoints) + extra + 1.0
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), bound)
        except asyncio.TimeoutError:
            raise CoordError(f"etcd call {getattr(fn, '__name__', fn)} took more than {bound}s") from None

    async def _set_role(self, role: Role) -> None:
        async with self._changed:
            self._role = role
            self._changed.notify_all()

    async def _seen(self, kv: KeyValue | None) -> None:
        async with self._changed:
            self._leader = kv
            self._changed.notify_all()

    def _value(self) -> str:
        return json.dumps({"name": self.name, **self.info}, sort_keys=True)

    async def _register(self) -> None:
        if self._lease is None:
            return
        value = json.dumps({"name": self.name, "role": self._role.value, **self.info}, sort_keys=True)
        try:
            await self._call(self.coord.put, HEADS_PREFIX + self.name, value, lease=self._lease.id)
        except CoordError as e:
            log.info("%s: registration not written: %s", self.name, e)

    async def _new_lease(self) -> None:
        sent = self._clock()
        lease = await self._call(self.coord.grant, self.ttl)
        self._lease, self._expires_at = lease, sent + lease.ttl
        if lease.ttl - self.margin < self.renew_every:
            log.warning("%s: lease TTL %ss leaves less than one renewal before the demotion margin",
                        self.name, lease.ttl)
        await self._register()

    async def _keepalive_loop(self) -> None:
        """Renew every `renew_every`; after a failure, again at once (after
        `retry`): an etcd leader change must not eat the margin."""
        while not self._stopped:
            await self._revoke_stale()
            lease = self._lease
            pause = self.renew_every
            if lease is not None:
                sent = self._clock()
                try:
                    ttl = await self._call(self.coord.keepalive, lease.id)
                    if self._lease is lease:
                        self._expires_at = sent + ttl
                except LeaseExpired:
                    if self._lease is lease:
                        await self._lease_lost(lease)
                except CoordError as e:
                    log.debug("%s: keepalive failed: %s", self.name, e)
                    pause = self.retry
            await asyncio.sleep(pause)

    async def _revoke_stale(self) -> None:
        for lease_id in list(self._stale_leases):
            try:
                await self._call(self.coord.revoke, lease_id)
            except CoordError:
                return
            self._stale_leases.remove(lease_id)
            log.info("%s: abandoned lease %x revoked", self.name, lease_id)

    async def _lease_lost(self, lease: Lease) -> None:
        log.warning("%s: lease %x is gone", self.name, lease.id)
        self._lease = None
        await self._demote("lease expired", release=False, hold=0.0)

    async def _watchdog(self) -> None:
        """Demote at `expiry - margin` (the clock may be a test's)."""
        while not self._stopped:
            if self._role is Role.ACTIVE and self._expires_at is not None:
                left = self._expires_at - self.margin - self._clock()
                if left <= 0:
                    lease = self._lease
                    if lease is not None:  # abandon it: it must never be renewed again
                        self._lease = None
                        self._stale_leases.append(lease.id)
                    await self._demote("lease not renewed in time", release=False, hold=0.0)
                    continue
                await asyncio.sleep(min(WATCHDOG_TICK, left))
            else:
                await asyncio.sleep(WATCHDOG_TICK)

    async def _demote(self, reason: str, *, release: bool, hold: float) -> None:
        if self._role is not Role.ACTIVE:
            self._hold_until = max(self._hold_until, self._clock() + hold)
            return
        epoch = self._epoch
        self.demotions.append((self._clock(), reason))
        self._hold_until = self._clock() + hold
        await self._set_role(Role.PASSIVE)
        await self._seen(None)
        log.warning("%s: demoted from active at epoch %s: %s", self.name, epoch, reason)
        try:
            await self._on_demote(reason)
        except Exception:
            log.exception("%s: on_demote failed", self.name)
        if release and epoch is not None:
            try:
                await self._call(self.coord.delete_if, LEADER_KEY, epoch)
            except CoordError as e:
                log.warning("%s: leader key not released (%s); it expires with the lease", self.name, e)
        await self._register()

    async def _campaign_loop(self) -> None:
        while not self._stopped:
            try:
                if self._lease is None:
                    await self._new_lease()
                if self._role is Role.ACTIVE:
                    await self._check_still_leader()
                    await asyncio.sleep(self.renew_every)
                else:
                    await self._campaign_or_watch()
            except CoordError as e:
                log.debug("%s: etcd: %s", self.name, e)
                await asyncio.sleep(self.retry)

    async def _check_still_leader(self) -> None:
        kv = await self._call(self.coord.get, LEADER_KEY)
        if self._role is Role.ACTIVE and (kv is None or kv.create_revision != self._epoch):
            await self._demote("leader key lost", release=False, hold=0.0)

    async def _campaign_or_watch(self) -> None:
        """Passive: campaign if there is no leader (unless holding back), else
        note the leader and wait (bounded) for its key to change."""
        lease = self._lease
        assert lease is not None
        kv = await self._call(self.coord.get, LEADER_KEY)
        if kv is None and self._clock() < self._hold_until:
            await self._seen(None)
            await asyncio.sleep(min(HOLD_POLL, self._hold_until - self._clock()))
            return
        if kv is None:
            outcome = await self._call(self.coord.create, LEADER_KEY, self._value(), lease=lease.id)
            kv = outcome.kv
            if (outcome.created or kv.lease == lease.id) and self._lease is lease:
                await self._elected(kv)
                return
        await self._seen(kv)
        await self._call(self.coord.watch, LEADER_KEY, start_revision=kv.mod_revision + 1,
                         timeout=self.watch_timeout, extra=self.watch_timeout)

    async def _elected(self, kv: KeyValue) -> None:
        if self._stopped:  # won while stopping: release the key at once, never act on it
            try:
                await self._call(self.coord.delete_if, LEADER_KEY, kv.create_revision)
            except CoordError as e:
                log.warning("%s: leader key won while stopping not released (%s)", self.name, e)
            return
        self._epoch = kv.create_revision
        await self._seen(kv)
        await self._set_role(Role.ACTIVE)
        log.warning("%s: active at epoch %d", self.name, self._epoch)
        await self._register()
        try:
            await self._call(self.coord.raise_to, EPOCH_KEY, self._epoch)
        except CoordError as e:  # the leader key holds the epoch too; ISUs read either
            log.warning("%s: %s not raised to %d: %s", self.name, EPOCH_KEY, self._epoch, e)
        if self._on_elected is not None:
            try:
                await self._on_elected(self._epoch)
            except Exception:
                log.exception("%s: on_elected failed at epoch %d", self.name, self._epoch)
                await self._demote("takeover failed", release=True, hold=2 * self.ttl)
