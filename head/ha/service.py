"""The HA service: what the daemon composes when head.json has an `ha` section.

A head with HA starts PASSIVE: its API answers, its mirror receiver (if
configured) keeps the warm copy of the mapping table, and it campaigns
(head.ha.election). Nothing else runs: no member connection, no array, no
export.

Takeover (`on_elected(E)`), in this order, each step timed into the failover
timeline (head.ha.timeline), published in etcd at /opie/CLUSTER/failover:

  fence        every member ISU fenced at E (head.ha.fencing); nothing is
               written before N-1 members acknowledged. A member whose ISU did
               not acknowledge is failed for E: it is not connected (the array
               assembles degraded) and a background task keeps fencing its ISU;
               only once that ISU acknowledged E can the member watcher's
               epoch-E connection be admitted and the member re-added (resync).
  connect      member connections bound to E (head.members)
  assemble     the array, resyncing only its dirty regions
  pool         the pool opened; the mirror copy's generation checked against it
  exports      volumes and snapshots over NBD; the member watcher (epoch E)
  mounts       mounts and shares as a single head has them
  address      the service address taken (a /32 with gratuitous ARP), if configured
  connections  the old active's published client connections reset, if any

Then, while active: the mirror sender feeds the peer's receiver (its state
is put at /opie/CLUSTER/mirror), and the client connections of the service
address are published at /opie/CLUSTER/connections.

Demotion (`on_demote`, from the election: lease not renewed, key lost,
resign, stop): first stop writing (the watcher stopped, every member
connection dropped at once: nothing more reaches an ISU), then release the
service address, then stop shares, mounts, exports, pool and array (bounded
by STOP_TIMEOUT); the head is passive again and campaigns when the election
lets it. A takeover still running is cancelled first. Takeover, demotion and
switchover never overlap (one lock).

Switchover (`switchover`, the API's POST /v1/ha/switchover; active only):
release the address, stop serving cleanly (pool and array flushed and
closed while the members are still connected), then resign: the passive
takes over with nothing to resync.

Everything here runs on the head's event loop; etcd calls go to threads,
each bounded (discovery.coord's timeouts).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from opie.discovery.coord import Coord
from opie.discovery.errors import CoordError
from opie.head.config import HAConfig
from opie.head.errors import HeadError, ServiceAddressError
from opie.head.ha import connections
from opie.head.ha.address import ServiceAddress
from opie.head.ha.election import DEFAULT_MARGIN, Election, Role
from opie.head.ha.errors import TakeoverError
from opie.head.ha.fencing import fence_all
from opie.head.ha.mirror import MirrorReceiver, MirrorSender, MirrorState
from opie.head.ha.timeline import Timeline
from opie.nbd import uri as nbd_uri
from opie.netaddr import parse_host_port

log = logging.getLogger(__name__)

FAILOVER_KEY = "failover"        # the last takeover's timeline (JSON)
CONNECTIONS_KEY = "connections"  # the active's client connections of the service address
MIRROR_KEY = "mirror"            # the mirror sender's state, as the active sees it
STOP_TIMEOUT = 30.0              # bound on a demotion's stop sequence after it stopped writing
ADDRESS_TIMEOUT = 5.0            # bound on taking or releasing the service address
REFENCE_EVERY = 1.0              # how often an ISU that missed the fence is asked again
PUBLISH_EVERY = 1.0              # how often the active publishes its client connections
MIRROR_DIR = "mirror"            # the receiver's copy, under the head's state dir


class HAService:
    """One head's part in the active/passive pair (see the module docstring).
    Build on the head's loop after the head's API is up; `start`, `stop`,
    `switchover` and the status calls are loop-only."""

    def __init__(self, head: Any, cfg: HAConfig) -> None:
        """`head` is the daemon's Head (head.daemon): its serving steps are the takeover's."""
        self.head = head
        self.cfg = cfg
        self.coord = Coord(cfg.etcd, cfg.cluster, head.cfg.tls_dir)
        self.election = Election(self.coord, head.cfg.name, self._on_demote, on_elected=self._on_elected,
                                 ttl=cfg.lease_ttl, margin=min(DEFAULT_MARGIN, cfg.lease_ttl * 0.3),
                                 info={"api": head.api.url if head.api else None})
        self.address = (ServiceAddress.parse(cfg.service_interface, cfg.service_address)
                        if cfg.service_address and cfg.service_interface else None)
        # member URI -> its ISU's control channel ("HOST" on the well-known port, or HOST:PORT)
        self.controls = {u: cfg.control.get(u) or nbd_uri.parse(u).host for u in head.cfg.members}
        self.receiver: MirrorReceiver | None = None   # kept after close: its copy's generation
        self._receiving = False
        self.sender: MirrorSender | None = None
        self.timeline: Timeline | None = None     # the last takeover of this head
        self.unfenced: dict[str, str] = {}        # ISU control address -> why it did not acknowledge
        self._lock = asyncio.Lock()
        self._takeover: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Passive: the mirror receiver (if configured), then join the election."""
        await self._start_receiver()
        await self.election.start()

    async def stop(self) -> None:
        """The head stops: if active, stop serving cleanly and release the
        address; leave the election (the key released, the lease revoked)."""
        self._stopping = True
        aborted = self._takeover is not None
        if aborted:   # a takeover half done is stopped like a demotion
            self._takeover.cancel()
            await asyncio.gather(self._takeover, return_exceptions=True)
            await self.head.stop_writing()
        if self.election.role is Role.ACTIVE:
            async with self._lock:
                await self._stop_cleanly(after_abort=aborted)
        await self.election.stop()
        await self._close_receiver()
        await asyncio.to_thread(self.coord.close)

    async def switchover(self) -> dict[str, Any]:
        """Planned handover: stop serving cleanly (everything flushed), then
        resign; the passive takes over. HeadError(409) on a passive head."""
        if self.election.role is not Role.ACTIVE:
            raise HeadError(f"this head is {self.role}; ask the active head ({self.election.leader or 'none'})")
        epoch = self.election.epoch
        async with self._lock:
            await self._stop_cleanly()
        await self.election.resign()
        log.warning("%s: switchover: resigned at epoch %s", self.head.cfg.name, epoch)
        return {"resigned": self.head.cfg.name, "epoch": epoch}

    # -- what the API and the status show ----------------------------------------------

    @property
    def role(self) -> str:
        return self.election.role.value

    def status(self) -> dict[str, Any]:
        """The HA state from memory (no etcd call): for GET /v1/status."""
        st = self.election.status()
        receiver = self.receiver.generation if self.receiver is not None else None
        st.update({
            "enabled": True, "cluster": self.cfg.cluster,
            "service_address": str(self.address.address) if self.address else None,
            "mirror": {"listen": self.cfg.mirror_listen, "peer": self.cfg.mirror_peer,
                       "sender": self.sender.state.value if self.sender is not None else None,
                       "copy": None if receiver is None else {"pool": str(receiver[0]), "seq": receiver[1]}},
            "unfenced": dict(self.unfenced),
            "demotions": [reason for _, reason in self.election.demotions],
            "taking_over": self._takeover is not None,
            "timeline": self.timeline.to_json() if self.timeline else None})
        return st

    async def describe(self) -> dict[str, Any]:
        """`status()` plus what etcd knows (the cluster's last failover and
        mirror state; None when etcd does not answer): for GET /v1/ha."""
        st = self.status()
        for key in (FAILOVER_KEY, MIRROR_KEY):
            try:
                kv = await self._etcd(self.coord.get, key)
                st[f"cluster_{key}"] = json.loads(kv.value) if kv else None
            except (CoordError, ValueError) as exc:
                log.info("ha status: %s not read from etcd: %s", key, exc)
                st[f"cluster_{key}"] = None
        return st

    # -- the election's hooks ------------------------------------------------------------

    async def _on_elected(self, epoch: int) -> None:
        """Run the takeover as a task on_demote can cancel; raises what the takeover raised
        (the election then demotes), returns quietly if it was cancelled by a demotion."""
        self._takeover = asyncio.create_task(self._take_over(epoch), name=f"takeover-{epoch}")
        try:
            await asyncio.wait({self._takeover})
        finally:
            task, self._takeover = self._takeover, None
        if not task.cancelled():
            task.result()

    async def _on_demote(self, reason: str) -> None:
        task = self._takeover
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.head.stop_writing()   # first: nothing more reaches an ISU
        async with self._lock:
            await self._stop_background()
            await self._release_address()
            try:
                await asyncio.wait_for(self.head.stop_serving(after_abort=True), STOP_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - a timeout or a close error: the head goes passive anyway
                log.error("%s: stop after demotion incomplete: %s", self.head.cfg.name, exc or "timeout")
            if not self._stopping:
                await self._start_receiver()
        log.warning("%s: passive (%s)", self.head.cfg.name, reason)

    # -- takeover ------------------------------------------------------------------------

    async def _take_over(self, epoch: int) -> None:
        name = self.head.cfg.name
        async with self._lock:
            await self._close_receiver()
            tl = Timeline(name, epoch)
            try:
                await self._steps(tl, epoch)
            finally:
                self.timeline = tl   # also a failed one: its last step says why
            log.warning("%s: active at epoch %d; takeover took %.3f s: %s", name, epoch, tl.seconds,
                        ", ".join(f"{s['step']} {s['seconds']:.3f}" for s in tl.steps))
            await self._put(FAILOVER_KEY, json.dumps(tl.to_json()))
            await self._start_background()

    async def _steps(self, tl: Timeline, epoch: int) -> None:
        """The takeover's steps in order, each timed into `tl`."""
        head = self.head
        with tl.step("fence") as d:
            skip = await self._fence(epoch)
            d.update(acknowledged=len(self.controls) - len(skip), members=len(self.controls))
        with tl.step("connect") as d:
            await head.connect_members(epoch, skip=frozenset(skip))
            d["connected"] = sum(c is not None for c in head.clients)
        with tl.step("assemble") as d:
            fresh = await head.assemble()
            d["array"] = head.array.state_string()
        with tl.step("pool") as d:
            await head.open_pool(fresh)
            d["mirror_copy"] = self._mirror_copy_matches()
        with tl.step("exports"):
            await head.start_exports()
        with tl.step("mounts"):
            await head.start_files()
        with tl.step("address") as d:
            d["address"] = await self._take_address()
        with tl.step("connections") as d:
            d["reset"] = await self._reset_old_connections()

    async def _fence(self, epoch: int) -> set[str]:
        """Fence every member ISU at `epoch`; the members whose ISU did not
        acknowledge (to be left out). TakeoverError without N-1 members."""
        isus = list(dict.fromkeys(self.controls.values()))
        result = await fence_all(isus, epoch, self.head.client_tls)
        self.unfenced = dict(result.failed)
        skip = {u for u, isu in self.controls.items() if isu not in result.acked}
        members = len(self.controls)
        if members - len(skip) < members - 1:
            raise TakeoverError(f"fence at epoch {epoch}: only {members - len(skip)} of {members} members "
                                f"acknowledged (need {members - 1}): {'; '.join(result.failed.values())}")
        return skip

    def _mirror_copy_matches(self) -> str:
        """'none' (no mirror copy), 'current' (the copy is the pool's state on
        the array) or 'stale' (it differs: the pool was read from the array)."""
        if self.receiver is None or self.receiver.generation is None:
            return "none"
        return "current" if self.receiver.table_for(*self.head.pool.generation) is not None else "stale"

    async def _take_address(self) -> str | None:
        if self.address is None:
            return None
        try:
            await asyncio.wait_for(asyncio.to_thread(self.address.take), ADDRESS_TIMEOUT)
        except (ServiceAddressError, asyncio.TimeoutError) as exc:
            raise TakeoverError(f"service address {self.address.address}: {exc or 'timeout'}") from None
        return str(self.address.address)

    async def _release_address(self) -> None:
        if self.address is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self.address.release), ADDRESS_TIMEOUT)
        except (ServiceAddressError, asyncio.TimeoutError) as exc:
            log.error("%s: service address %s not released: %s", self.head.cfg.name, self.address.address,
                      exc or "timeout")

    async def _reset_old_connections(self) -> int:
        """Reset the client connections the old active published; how many."""
        if self.address is None:
            return 0
        try:
            kv = await self._etcd(self.coord.get, CONNECTIONS_KEY)
            conns = connections.decode(kv.value.decode()) if kv else []
        except (CoordError, ServiceAddressError) as exc:
            log.warning("old client connections not read: %s", exc)
            return 0
        if conns:
            await asyncio.to_thread(connections.reset_connections, conns)
        return len(conns)

    async def _stop_cleanly(self, after_abort: bool = False) -> None:
        """While active and connected: address released, then everything stopped and flushed
        (unless the members were dropped already: head.stop_serving)."""
        await self._release_address()
        await self.head.stop_serving(after_abort=after_abort)
        await self._stop_background()

    # -- while active ----------------------------------------------------------------------

    async def _start_background(self) -> None:
        if self.cfg.mirror_peer:
            host, port = parse_host_port(self.cfg.mirror_peer)
            self.sender = MirrorSender(host, port, self.head.cfg.tls_dir, on_state=self._mirror_state)
            self.sender.start(await self.head.pool.set_commit_hook(self.sender.on_commit))
        if self.unfenced:
            self._tasks.append(asyncio.create_task(self._refence(self.election.epoch), name="ha-refence"))
        if self.address is not None and self.cfg.client_ports:
            self._tasks.append(asyncio.create_task(self._publish_connections(), name="ha-connections"))

    async def _stop_background(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.sender is not None:
            await self.sender.close()
            self.sender = None

    def _mirror_state(self, state: MirrorState) -> None:
        value = json.dumps({"head": self.head.cfg.name, "peer": self.cfg.mirror_peer, "state": state.value,
                            "at": time.time()})
        self._tasks.append(asyncio.create_task(self._put(MIRROR_KEY, value), name="ha-mirror-state"))

    async def _refence(self, epoch: int) -> None:
        """Keep fencing the ISUs that missed the takeover's fence; once one
        acknowledges, the member watcher's epoch connection is admitted."""
        while self.unfenced:
            await asyncio.sleep(REFENCE_EVERY)
            result = await fence_all(list(self.unfenced), epoch, self.head.client_tls)
            for isu in result.acked:
                log.warning("ISU %s fenced at epoch %d after the takeover; its members may rejoin", isu, epoch)
                self.unfenced.pop(isu, None)

    async def _publish_connections(self) -> None:
        assert self.address is not None
        last = None
        while True:
            conns = await asyncio.to_thread(connections.client_connections, self.address.address,
                                            self.cfg.client_ports)
            text = connections.encode(conns)
            if text != last and await self._put(CONNECTIONS_KEY, text):
                last = text
            await asyncio.sleep(PUBLISH_EVERY)

    # -- passive ----------------------------------------------------------------------------

    async def _start_receiver(self) -> None:
        """Listen for the active's mirror (a fresh receiver on the copy in the state dir)."""
        if not self.cfg.mirror_listen or self._receiving:
            return
        host, port = parse_host_port(self.cfg.mirror_listen)
        receiver = MirrorReceiver(self.head.state_dir / MIRROR_DIR, self.head.cfg.tls_dir)
        try:
            await receiver.start(host, port)
        except OSError as exc:
            log.error("mirror receiver on %s not started: %s", self.cfg.mirror_listen, exc)
            return
        self.receiver, self._receiving = receiver, True

    async def _close_receiver(self) -> None:
        if self.receiver is not None and self._receiving:
            await self.receiver.close()
            self._receiving = False

    # -- etcd ---------------------------------------------------------------------------------

    async def _etcd(self, fn, *args: Any) -> Any:
        """A coord call in a thread, bounded like the election's."""
        bound = self.coord.timeout * len(self.coord.endpoints) + 1.0
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), bound)
        except asyncio.TimeoutError:
            raise CoordError(f"etcd call took more than {bound}s") from None

    async def _put(self, key: str, value: str) -> bool:
        try:
            await self._etcd(self.coord.put, key, value)
        except CoordError as exc:
            log.warning("/opie/%s/%s not written: %s", self.cfg.cluster, key, exc)
            return False
        return True
