"""The head's side of discovery: which ISUs exist, which are ours, and adopting new ones.

`Cluster` runs the ISU registry (zeroconf browse + heartbeat liveness) and,
when the head config has a `lease_pool`, the lease server that gives new
ISUs their addresses. ISUs are classified by the `cluster_id` of the head
config: new (unassigned), member, spare, or foreign (another cluster's;
never touched).

Adoption (`adopt(uuid, role)`, behind POST /v1/isus/UUID/adopt): the head
asks the ISU for its exports over the ISU's control channel (isu.control,
mutual TLS with the cluster CA; the ISU lets only a certificate of role
head join), tells it its cluster config (cluster id,
role, head address, member export), which the ISU persists in its isu.json
and shows at once in its TXT (role, cluster, gen), then records the ISU in
the head config (`isus`), durable before the call returns. One export per
ISU becomes a member, so the array survives the loss of any one ISU.

Boot-time assembly (`member_uris`): with `members: []` in the head config,
the head waits (bounded by `discover_timeout`) until every adopted member
ISU is discovered and alive, and at least `discover_members` are adopted
(an admin adopts them meanwhile on a first boot), then builds the member
URIs from each ISU's announced address and port and the export recorded
at adoption. The array then assembles by the UUIDs in the members'
superblocks; with one member missing after the timeout it assembles degraded.

Members that come back: an adopted member ISU that is found, changes or
turns alive again is offered to the head's member watcher by URI, so a head
that booted degraded (a member missing) re-adds it and resyncs what it
missed, as with a configured member list.

Threads: registry callbacks arrive on zeroconf's and the heartbeat's
threads; they update `_events` under a lock and hand member URIs to the
head's event loop; everything else runs on that loop. `start`/`close` block (run them in an executor).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opie.discovery.record import IsuClass
from opie.head import config as head_config
from opie.head.errors import HeadError
from opie.isu import control
from opie.isu.errors import ControlError
from opie.netaddr import parse_host_port

if TYPE_CHECKING:
    from opie.discovery.lease_server import LeaseServer
    from opie.discovery.record import IsuRecord
    from opie.discovery.registry import IsuRegistry, RegistryEvent

log = logging.getLogger(__name__)

LEASES_FILE = "leases.json"
WAIT_STEP = 0.2


class Cluster:
    def __init__(self, head: Any) -> None:
        """`head` is the daemon that composes this service (opie.head.daemon.Head);
        the cluster uses its config, TLS contexts, array and API."""
        self.head = head
        self.cfg = head.cfg
        api_host, self.api_port = parse_host_port(self.cfg.api_listen, default_host="127.0.0.1",
                                                  allow_port_zero=True)
        self.address = self.cfg.discover_address or api_host
        self.control_port = control.CONTROL_PORT   # where ISUs' control channels listen
        self.registry: IsuRegistry | None = None
        self.lease_server: LeaseServer | None = None
        self._lock = threading.Lock()
        self._events: dict[str, dict[str, float]] = {}   # uuid -> event kind -> when the head noticed
        self._adopting = asyncio.Lock()
        self._loop = asyncio.get_running_loop()  # built on the head's loop

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Lease server (if a pool is configured), then the registry; blocking."""
        from opie.discovery.registry import IsuRegistry  # noqa: PLC0415
        cfg = self.cfg
        if cfg.lease_pool:
            from opie.discovery.arp import arp_probe  # noqa: PLC0415
            from opie.discovery.lease_pool import LeasePool, parse_pool  # noqa: PLC0415
            from opie.discovery.lease_server import LeaseServer  # noqa: PLC0415
            from opie.isu.services import read_token  # noqa: PLC0415
            pool = LeasePool(str(Path(self.head.state_dir) / LEASES_FILE), parse_pool(cfg.lease_pool),
                             cfg.lease_prefixlen, lease_secs=cfg.lease_secs,
                             probe=lambda a: arp_probe(cfg.lease_interface, a))
            self.lease_server = LeaseServer(pool, read_token(str(cfg.lease_token_file)), cfg.lease_interface,
                                            head=(self.address, self.api_port))
            self.lease_server.start()
        self.registry = IsuRegistry(self.address, cfg.cluster_id, self._on_event)
        try:
            self.registry.start()
        except BaseException:
            self.close()
            raise
        log.info("cluster %s: discovering ISUs on %s", cfg.cluster_id, self.address)

    def close(self) -> None:
        if self.registry is not None:
            self.registry.close()
            self.registry = None
        if self.lease_server is not None:
            self.lease_server.close()
            self.lease_server = None

    def _on_event(self, event: RegistryEvent) -> None:
        with self._lock:
            self._events.setdefault(event.uuid, {})[event.kind] = event.at
        if event.kind == "changed":
            log.info("isu %s (%s): state %s, gen %d", event.uuid, event.isu_class.value,
                     event.record.state, event.record.config_gen)
        elif event.kind == "dead" and event.isu_class in (IsuClass.MEMBER, IsuClass.SPARE):
            log.error("isu %s (%s at %s): no heartbeat: dead", event.uuid, event.isu_class.value,
                      event.record.address)
        if event.kind in ("found", "changed", "alive"):
            self._offer_member(event.uuid, event.record)

    def _offer_member(self, uuid: str, record: IsuRecord) -> None:
        """An adopted member ISU is (again) on the network: give its URIs to the
        member watcher, which re-adds them if their role failed (a member that
        was missing when the head booted and assembled degraded, or one that
        came back at a new address). Any thread; the watcher runs on the loop."""
        entry = self.adopted(uuid)
        if entry is None or entry["role"] != "member":
            return
        uris = self._uris(entry, record)
        self._loop.call_soon_threadsafe(self._give_watcher, uris)

    def _give_watcher(self, uris: list[str]) -> None:
        watcher = self.head.watcher
        if watcher is not None:
            for uri in uris:
                watcher.add_uri(uri)

    def _uris(self, entry: dict[str, Any], record: IsuRecord) -> list[str]:
        scheme = "nbds" if self.cfg.tls_dir else "nbd"
        return [f"{scheme}://{record.address}:{record.port}/{export}" for export in entry["exports"]]

    # ------------------------------------------------------------ views
    def adopted(self, uuid: str) -> dict[str, Any] | None:
        return next((i for i in self.cfg.isus if i["uuid"] == uuid), None)

    def isus(self) -> list[dict[str, Any]]:
        """Every ISU seen on the network, plus adopted ones not seen (class from the config)."""
        views = self.registry.isus() if self.registry else {}
        with self._lock:
            events = {u: dict(e) for u, e in self._events.items()}
        out = []
        for uuid, v in sorted(views.items()):
            r = v.record
            entry = self.adopted(uuid)
            out.append({"uuid": uuid, "name": r.name, "address": r.address, "port": r.port,
                        "state": r.state, "disks": r.disks, "capacity": r.capacity, "version": r.version,
                        "config_gen": r.config_gen, "cluster": r.cluster, "role": r.role,
                        "class": v.isu_class.value, "alive": v.alive,
                        "adopted": entry["role"] if entry else None,
                        "exports": entry["exports"] if entry else [], "events": events.get(uuid, {})})
        for entry in self.cfg.isus:
            if entry["uuid"] not in views:
                out.append({"uuid": entry["uuid"], "name": "", "address": "", "port": 0, "state": "missing",
                            "disks": 0, "capacity": 0, "version": "", "config_gen": 0,
                            "cluster": self.cfg.cluster_id, "role": entry["role"], "class": entry["role"],
                            "alive": False, "adopted": entry["role"], "exports": entry["exports"],
                            "events": events.get(entry["uuid"], {})})
        return out

    # ------------------------------------------------------------ adoption
    async def adopt(self, uuid: str, role: str) -> dict[str, Any]:
        """Make a new ISU a member or spare of this cluster; durable on both sides on return."""
        if role not in ("member", "spare"):
            raise HeadError(f"role: expected member or spare, got {role!r}", 400)
        try:
            uuid = str(uuidlib.UUID(uuid))
        except ValueError:
            raise HeadError(f"expected an ISU UUID, got {uuid!r}", 400) from None
        async with self._adopting:
            view = (self.registry.isus() if self.registry else {}).get(uuid)
            if view is None:
                raise HeadError(f"no ISU {uuid} has been discovered", 404)
            if view.isu_class is IsuClass.FOREIGN:
                raise HeadError(f"ISU {uuid} belongs to cluster {view.record.cluster}; not touching it")
            if not view.alive:
                raise HeadError(f"ISU {uuid} does not answer heartbeats")
            entry = self.adopted(uuid)
            if entry is not None and entry["role"] != role:
                raise HeadError(f"ISU {uuid} is already adopted as {entry['role']}")
            if role == "member" and entry is None and self.head.array is not None:
                raise HeadError("the array is running; growing it is not supported: adopt the ISU as a spare")
            address = view.record.address
            try:
                status = await control.call(address, {"op": "status"}, self.head.client_tls,
                                            port=self.control_port)
                exports = entry["exports"] if entry else [str(e) for e in status.get("exports", [])][:1]
                if not exports:
                    raise HeadError(f"ISU {uuid} exports no disk")
                reply = await control.call(address, {"op": "join", "cluster": self.cfg.cluster_id, "role": role,
                                                     "head": f"{self.address}:{self.api_port}",
                                                     "exports": exports}, self.head.client_tls,
                                            port=self.control_port)
            except ControlError as exc:
                raise HeadError(str(exc), 502) from None
            if entry is None:
                entry = {"uuid": uuid, "role": role, "exports": exports}
                await asyncio.get_running_loop().run_in_executor(None, self._persist, entry)
            log.info("isu %s adopted as %s (exports %s; its config generation %s)", uuid, role,
                     ", ".join(exports), reply.get("config_gen"))
            return {"uuid": uuid, "role": role, "exports": exports, "address": address,
                    "config_gen": reply.get("config_gen")}

    def _persist(self, entry: dict[str, Any]) -> None:
        """Add `entry` to the head config on disk (read afresh: other keys stay as they are)."""
        on_disk = head_config.load(self.head.state_dir)
        on_disk.isus = [i for i in on_disk.isus if i["uuid"] != entry["uuid"]] + [entry]
        head_config.save(self.head.state_dir, on_disk)
        self.cfg.isus = [i for i in self.cfg.isus if i["uuid"] != entry["uuid"]] + [entry]

    # ------------------------------------------------------------ boot-time assembly
    async def member_uris(self) -> list[str]:
        """Wait (bounded) for the adopted members, then their NBD URIs from discovery."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.discover_timeout
        said = ""
        while True:
            members = [i for i in cfg.isus if i["role"] == "member"]
            need = max(cfg.discover_members, 2)
            views = self.registry.isus() if self.registry else {}
            found = {i["uuid"]: views[i["uuid"]] for i in members
                     if i["uuid"] in views and views[i["uuid"]].alive}
            if len(members) >= need and len(found) == len(members):
                break
            if self.head.stopping is not None and self.head.stopping.is_set():
                raise HeadError("stopped while waiting for the member ISUs")
            if time.monotonic() > deadline:
                if len(members) >= need and len(found) >= len(members) - 1:
                    missing = sorted({i["uuid"] for i in members} - set(found))
                    log.error("member ISU %s not found in %.0f s; assembling degraded",
                              ", ".join(missing), cfg.discover_timeout)
                    break
                raise HeadError(f"waited {cfg.discover_timeout:.0f} s for member ISUs: {len(members)} adopted "
                                f"(need {need}), {len(found)} of them discovered and alive")
            now = f"{len(members)} of {need} members adopted, {len(found)} discovered and alive"
            if now != said:
                log.info("cluster %s: waiting for members: %s", cfg.cluster_id, now)
                said = now
            await asyncio.sleep(WAIT_STEP)
        uris = [uri for i in members if i["uuid"] in found for uri in self._uris(i, found[i["uuid"]].record)]
        log.info("cluster %s: members from discovery: %s", cfg.cluster_id, " ".join(uris))
        return uris
