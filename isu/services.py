"""What an ISU runs besides its NBD server: address, presence, console, control, disk events.

`IsuServices` composes the discovery and ISU building blocks around one
`ISUAgent`, which calls `before_serve` (console, then the lease: the address
comes before anything is served), `after_serve` (zeroconf announcement with
heartbeat and the control channel, both on the ISU's address and nowhere
else; lease keeping, udev disk watcher) and `stop`.

The announcement's TXT is computed from the agent and its `isu.json`:
disks/capacity from the served disks, state `unconfigured` (no cluster yet),
`ready`, or `degraded` (a disk has failed), cluster/role/gen from the ISU's
copy of the cluster config (written by a head's join, isu.control). Any
change (join, console setting, a disk failing) re-announces at once; an
address change (lease renewed to a new address, console `set address`)
moves the announcement and the control channel to the new address.

Disks (with `watch_disks`): a whole disk that appears is listed as
unassigned (status, console); a served disk that disappears is marked
failed at once, so its NBD export answers EIO and the TXT state becomes
`degraded`, which the head sees within milliseconds.

Threads: the console, lease keeping, presence and the disk watcher run on
their own threads; `_lock` serialises announcement changes.
"""
from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import os
import stat
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from opie.discovery.presence import IsuPresence
from opie.isu import fencing, identity
from opie.isu.addressing import (AcquiredLease, ConfigError, LeaseClient, LeaseDenied, LeaseTimeout,
                                 apply_address, parse_head, read_network)
from opie.isu.console import ConsoleServer, open_console
from opie.isu.control import CONTROL_PORT, ControlServer
from opie.isu.disks import DiskState
from opie.isu.udev import DiskEvent, DiskRoster, DiskWatcher, default_match
from opie.nbd import tls

if TYPE_CHECKING:
    from opie.isu.agent import ISUAgent

log = logging.getLogger(__name__)

CLUSTER_ID_MAX = 64
LEASE_ATTEMPT_SECS = 10.0
CONTROL_BIND_SECS = 10.0


def read_token(path: str) -> bytes:
    """The cluster token from `path`: hex on one line (e.g. `openssl rand -hex 32`)."""
    with open(path) as f:
        text = f.read().strip()
    try:
        token = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: expected the cluster token as hex") from None
    if len(token) < 16:
        raise ValueError(f"{path}: expected at least 16 bytes of token, got {len(token)}")
    return token


def software_version() -> str:
    try:
        return metadata.version("opie")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ServiceOptions:
    announce: str | None = None       # IPv4 address to announce on (a statically addressed ISU)
    lease: str | None = None          # interface to lease an address on
    token_file: str | None = None     # cluster token (hex) for the lease protocol
    console: str | None = None        # serial device of the admin console
    interface: str | None = None      # where a console-set address goes (default: lease interface, eth0)
    watch_disks: str | None = None    # fnmatch pattern of kernel disk names; "" = every real disk
    control_port: int = CONTROL_PORT

    def __post_init__(self) -> None:
        if self.lease and not self.token_file:
            raise ValueError("leasing an address needs the cluster token file")
        if self.announce is not None:
            ipaddress.IPv4Address(self.announce)  # raises ValueError

    @property
    def wanted(self) -> bool:
        return bool(self.announce or self.lease or self.console or self.watch_disks is not None)


def _agent_console(port: Any, services: IsuServices) -> ConsoleServer:
    """The serial console of this agent: its `handle` re-announces after each accepted setting."""
    class AgentConsole(ConsoleServer):
        def handle(self, raw: bytes) -> list[str]:
            lines = super().handle(raw)
            if lines and lines[-1].startswith("ok ") and not lines[-1].startswith("ok address"):
                services.config_changed()
            return lines

    return AgentConsole(port, services.agent.state_dir, status=services.console_status,
                        apply_address=services.apply_console_address)


class IsuServices:
    def __init__(self, agent: ISUAgent, options: ServiceOptions) -> None:
        """Without TLS, refuses a control channel that would listen on a network
        address (a leased or console-set one counts) unless the agent is `insecure`."""
        if not agent.tls_dir and (options.announce or options.lease or options.console):
            tls.vet_plain_listener("the control channel", None if options.lease or options.console
                                   else options.announce, insecure=agent.insecure)
        self.agent = agent
        self.options = options
        self.ifname = options.interface or options.lease or "eth0"
        self.token = read_token(options.token_file) if options.token_file else None
        self.address: str | None = options.announce
        self.presence: IsuPresence | None = None
        self.control: ControlServer | None = None
        self.control_port: int | None = None
        self.roster: DiskRoster | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._console: ConsoleServer | None = None
        self._console_port: Any = None
        self._watcher: DiskWatcher | None = None
        self._lease_client: LeaseClient | None = None
        self._lease: AcquiredLease | None = None
        self._devices: dict[str, str] = {}
        self._serving = False
        self._loop: asyncio.AbstractEventLoop | None = None   # the agent's, once serving

    # ------------------------------------------------------------ lifecycle
    async def before_serve(self) -> None:
        """Console first (an admin may need it to give the address), then the lease."""
        loop = asyncio.get_running_loop()
        if self.options.console:
            self._console_port = open_console(self.options.console)
            self._console = _agent_console(self._console_port, self)
            self._thread(self._console.serve, "isu-console")
        if self.options.lease:
            self._lease = await loop.run_in_executor(None, self._acquire)
            self.address = str(self._lease.address.ip)
        if self.address is None and self.options.console:
            persisted = read_network(self.agent.state_dir).address
            if persisted:
                self.address = str(ipaddress.IPv4Interface(persisted).ip)

    async def after_serve(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._serving = True
        if self.address is not None:
            await loop.run_in_executor(None, self._move_presence, self.address)
        if self._lease is not None and self._lease_client is not None:
            client, lease = self._lease_client, self._lease
            self._thread(lambda: client.keep(lease, self._stop, self._on_new_lease), "isu-lease-keeper")
        if self.options.watch_disks is not None:
            self._start_watcher()

    async def stop(self) -> None:
        """Goodbye first (the head sees a clean leave), then everything else."""
        self._stop.set()
        loop = asyncio.get_running_loop()
        if self.control is not None:
            await self.control.close()
        await loop.run_in_executor(None, self._stop_threads)

    def _stop_threads(self) -> None:
        with self._lock:
            if self.presence is not None:
                self.presence.close()
                self.presence = None
        if self._watcher is not None:
            self._watcher.stop()
        if self._console is not None:
            self._console.stop()
        for t in self._threads:
            t.join(10)
        if self._console_port is not None:
            self._console_port.close()

    def _thread(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ------------------------------------------------------------ address
    def _acquire(self) -> AcquiredLease:
        """Lease an address, retrying until a lease server answers (nothing is served before)."""
        assert self.options.lease is not None and self.token is not None
        self._lease_client = LeaseClient(self.options.lease, self.token, self.agent.state_dir,
                                         uuid=None)
        while True:
            try:
                return self._lease_client.acquire(timeout=LEASE_ATTEMPT_SECS)
            except LeaseTimeout:
                log.warning("%s: no lease server answered in %.0f s; still asking",
                            self.options.lease, LEASE_ATTEMPT_SECS)
            except LeaseDenied as exc:
                log.error("%s: lease refused: %s; asking again", self.options.lease, exc)
                if self._stop.wait(2.0):
                    raise

    def _on_new_lease(self, lease: AcquiredLease) -> None:
        self._move_presence(str(lease.address.ip))

    def apply_console_address(self, iface: ipaddress.IPv4Interface) -> None:
        """The console's apply hook: the address on the interface, the announcement moved there."""
        apply_address(self.ifname, iface)
        self.config_changed()
        if self._serving:
            self._move_presence(str(iface.ip))

    def _move_presence(self, address: str) -> None:
        """(Re)announce on `address`, and move the control channel there; blocking
        (~1 s of mDNS probing). Any thread but the agent's loop."""
        with self._lock:
            if self.presence is not None:
                if self.presence.record.address == address:
                    return
                self.presence.close()
                self.presence = None
            self.address = address
            assert self._loop is not None
            asyncio.run_coroutine_threadsafe(self._bind_control(address), self._loop).result(CONTROL_BIND_SECS)
            presence = IsuPresence(self.agent.uuid, address, self.agent.port, **self.txt_fields())
            presence.start()
            self.presence = presence
            log.info("isu %s: announced at %s", self.agent.uuid, address)

    # ------------------------------------------------------------ what is announced
    def state(self) -> str:
        cfg = identity.load(self.agent.state_dir)
        if any(d.state is DiskState.FAILED for d in self.agent.disks.values()):
            return "degraded"
        return "ready" if cfg.get("cluster") else "unconfigured"

    def txt_fields(self) -> dict[str, Any]:
        cfg = identity.load(self.agent.state_dir)
        return {"state": self.state(), "disks": len(self.agent.disks),
                "capacity": sum(d.size for d in self.agent.disks.values()),
                "version": software_version(), "config_gen": int(cfg.get("config_gen", 0)),
                "cluster": str(cfg.get("cluster") or ""), "role": str(cfg.get("role") or ""),
                "name": str(cfg.get("name") or "")}

    def refresh(self) -> None:
        """Announce the current TXT now (no-op before the announcement starts)."""
        with self._lock:
            if self.presence is not None:
                self.presence.update(**self.txt_fields())

    def config_changed(self) -> None:
        """The ISU config changed on the console: bump its generation and re-announce."""
        with self._lock:
            cfg = identity.load(self.agent.state_dir)
            identity.update(self.agent.state_dir, config_gen=int(cfg.get("config_gen", 0)) + 1)
            self.refresh()

    def status(self) -> dict[str, Any]:
        cfg = identity.load(self.agent.state_dir)
        control = self.control.listening if self.control is not None else None
        return {"address": self.address, "control": control, "state": self.state(), "epoch": self.agent.gate.accepted,
                "cluster": cfg.get("cluster") or "",
                "role": cfg.get("role") or "", "config_gen": int(cfg.get("config_gen", 0)),
                "unassigned_disks": sorted(self.roster.unassigned) if self.roster else [],
                "failed_disks": sorted(n for n, d in self.agent.disks.items()
                                       if d.state is DiskState.FAILED)}

    def console_status(self) -> dict[str, str]:
        st = self.status()
        return {"uuid": self.agent.uuid, "state": st["state"], "cluster": st["cluster"] or "-",
                "role": st["role"] or "-", "gen": str(st["config_gen"]),
                "listen": f"{self.agent.host}:{self.agent.port}",
                "disks": " ".join(f"{d.name}={d.state.value}" for d in self.agent.disks.values()),
                "unassigned": " ".join(st["unassigned_disks"]) or "-"}

    # ------------------------------------------------------------ control channel
    async def _bind_control(self, address: str) -> None:
        """Serve the control channel on `address` only (where heads reach this ISU),
        closing it where it was. Mutual TLS with the agent's certificates; without
        them only `status` is answered (isu.control)."""
        if self.control is not None:
            await self.control.close()
        ctx = tls.server_context(self.agent.tls_dir) if self.agent.tls_dir else None
        self.control = ControlServer(self._handle_control, ctx)
        self.control_port = await self.control.start(address, self.control_port or self.options.control_port)

    async def _handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "status":
            return {"ok": True, "uuid": self.agent.uuid, "nbd_port": self.agent.port,
                    "tls": bool(self.agent.tls_dir), "exports": list(self.agent.disks),
                    "disks": [d.status() for d in self.agent.disks.values()], **self.status()}
        if op == "join":
            return await asyncio.get_running_loop().run_in_executor(None, self._join, request)
        if op == "fence":
            return await fencing.answer_fence(self.agent.gate, self.agent.server, request)
        return {"ok": False, "error": f"unknown op {op!r:.40}"}

    def _join(self, request: dict[str, Any]) -> dict[str, Any]:
        """Take the cluster config a head sends; durable before the reply."""
        cluster, role, head = request.get("cluster"), request.get("role"), request.get("head")
        exports = request.get("exports", [])
        if not isinstance(cluster, str) or not 1 <= len(cluster) <= CLUSTER_ID_MAX \
                or not cluster.isprintable() or " " in cluster:
            return {"ok": False, "error": f"cluster: expected 1..{CLUSTER_ID_MAX} printable characters"}
        if role not in ("member", "spare"):
            return {"ok": False, "error": f"role: expected member or spare, got {role!r:.20}"}
        if head is not None:
            try:
                parse_head(str(head))
            except ConfigError as exc:
                return {"ok": False, "error": f"head: {exc}"}
        if not isinstance(exports, list) or not all(e in self.agent.disks for e in exports):
            return {"ok": False, "error": f"exports: expected names among {sorted(self.agent.disks)}"}
        with self._lock:
            cfg = identity.load(self.agent.state_dir)
            if cfg.get("cluster") and cfg["cluster"] != cluster:
                return {"ok": False, "error": f"this ISU belongs to cluster {cfg['cluster']}"}
            gen = int(cfg.get("config_gen", 0)) + 1
            identity.update(self.agent.state_dir, cluster=cluster, role=role, cluster_head=head,
                            member_exports=exports, config_gen=gen)
            log.info("isu %s: joined cluster %s as %s (config generation %d)",
                     self.agent.uuid, cluster, role, gen)
            self.refresh()
        return {"ok": True, "config_gen": gen}

    # ------------------------------------------------------------ disks
    def _start_watcher(self) -> None:
        pattern = self.options.watch_disks
        match = (lambda name: fnmatch.fnmatchcase(name, pattern)) if pattern else default_match
        self._devices = self._kernel_names()
        self.roster = DiskRoster(self._devices, on_new_disk=self._disk_added,
                                 on_member_failed=self._disk_failed)
        self._watcher = DiskWatcher(self.roster.handle, match=match)
        self._watcher.start()

    def _kernel_names(self) -> dict[str, str]:
        """Kernel name (sdb, loop4000) -> export name, for the served block devices."""
        names = {}
        for disk in self.agent.disks.values():
            real = os.path.realpath(disk.path)
            try:
                if stat.S_ISBLK(os.stat(real).st_mode):
                    names[os.path.basename(real)] = disk.name
            except OSError:
                continue
        return names

    def _disk_added(self, event: DiskEvent) -> None:
        log.info("isu %s: new disk %s (%s bytes) is unassigned", self.agent.uuid, event.name,
                 event.size_bytes)

    def _disk_failed(self, event: DiskEvent) -> None:
        """A served disk vanished: fail it now (EIO from here on) and tell the head (TXT)."""
        export = self._devices.get(event.name, event.name)
        disk = self.agent.disks.get(export)
        if disk is not None and disk.state is not DiskState.FAILED:
            disk.state = DiskState.FAILED
            log.error("isu %s: disk %s (%s) removed: failed", self.agent.uuid, export, event.devnode)
        self.refresh()
