"""The ISU agent: serve this node's disks as NBD exports.

Start order (the seed's 1.8.1): load or create the identity, open every
disk (refusing the whole start on a bad disk spec, before anything is
served), then start the NBD server. The agent knows
nothing of the cluster services around it (isu.services): it calls the
hooks of the `AgentServices` it is given, and isu.node composes the two
and runs them as a process.

Fencing (isu.fencing): the epoch gate loads the accepted epoch before any
disk is opened or anything served (a torn record refuses the start), and
the NBD server asks it to admit every connection.

TLS: with a tls_dir, the server requires TLS and a client certificate
signed by the cluster CA (forced-TLS mode); without one it serves plain NBD,
which only tests and benchmarks should use: on loopback, or elsewhere only
when the admin passed --insecure.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Protocol

from opie.isu import identity
from opie.isu.fencing import EpochGate, EpochVerifier
from opie.isu.disks import Disk, DiskError, DiskSpec
from opie.nbd import tls
from opie.nbd.server import NBDServer, TLSMode
from opie.netaddr import parse_host_port

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/opie/isu"


def parse_listen(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text, default_host="0.0.0.0", allow_port_zero=True)
    except ValueError as exc:
        raise ValueError(f"invalid listen address: {exc}") from None


def default_workers() -> int:
    """One NBD worker thread per CPU: connections are served in parallel."""
    return max(2, min(8, os.cpu_count() or 2))


class AgentServices(Protocol):
    """What the agent runs around its NBD server (isu.services.IsuServices)."""

    async def before_serve(self) -> None:
        """Runs before the NBD server starts (the address comes first)."""

    async def after_serve(self) -> None:
        """Runs once the NBD server is listening."""

    async def stop(self) -> None:
        """Runs before the NBD server closes."""

    def status(self) -> dict[str, Any]:
        """Fields merged into the agent's status."""


class ISUAgent:
    """One ISU: its identity, its disks and the NBD server exporting them."""

    def __init__(self, state_dir: str, disk_specs: list[str], listen: str, tls_dir: str | None = None,
                 workers: int | None = None, insecure: bool = False,
                 epoch_verifier: EpochVerifier | None = None):
        """Refuses (before anything is created) plain NBD on a network address
        unless `insecure` (nbd.tls.vet_plain_listener). `epoch_verifier`: asked
        before each fence (isu.fencing.EpochGate)."""
        self.host, self.port = parse_listen(listen)
        self.tls_dir = tls_dir
        self.insecure = insecure
        if not tls_dir:
            tls.vet_plain_listener(f"NBD on {listen}", self.host, insecure=insecure)
        self.state_dir = state_dir
        self.config = identity.load(state_dir)
        self.uuid: str = self.config["uuid"]
        self.gate = EpochGate(state_dir, epoch_verifier)
        specs = [DiskSpec.parse(s) for s in disk_specs]
        if not specs:
            raise DiskError("an ISU needs at least one --disk")
        names = [s.name for s in specs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise DiskError(f"two disks would be exported under the same name: {', '.join(sorted(dup))}")
        self.disks: dict[str, Disk] = {}
        try:
            for spec in specs:
                disk = Disk(spec)
                self.disks[disk.name] = disk
        except BaseException:
            self.close_disks()
            raise
        ctx = tls.server_context(tls_dir) if tls_dir else None
        self.server = NBDServer(self.disks, tls_context=ctx,
                                tls_mode=TLSMode.REQUIRE if ctx else TLSMode.OFF,
                                workers=workers if workers is not None else default_workers(),
                                epoch_gate=self.gate)
        self.services: AgentServices | None = None  # address, presence, console, control, udev

    def close_disks(self) -> None:
        for d in self.disks.values():
            d.close()

    async def start(self) -> None:
        if self.services:
            await self.services.before_serve()
        self.host, self.port = (await self.server.start(self.host, self.port))[:2]
        log.info("ISU %s serving %s on %s:%d", self.uuid, ", ".join(self.disks), self.host, self.port)
        if self.services:
            await self.services.after_serve()

    async def stop(self) -> None:
        if self.services:
            await self.services.stop()
        await self.server.close()
        for d in self.disks.values():
            try:
                os.fdatasync(d.fd)
            except OSError:
                pass
        self.close_disks()
        log.info("ISU %s stopped", self.uuid)

    def export_urls(self, host: str | None = None) -> list[str]:
        scheme = "nbds" if self.tls_dir else "nbd"
        h = host or ("127.0.0.1" if self.host in ("0.0.0.0", "") else self.host)
        if ":" in h:
            h = f"[{h}]"
        return [f"{scheme}://{h}:{self.port}/{name}" for name in self.disks]

    def status(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "listen": f"{self.host}:{self.port}", "tls": bool(self.tls_dir),
                "epoch": self.gate.accepted,
                "disks": [d.status() for d in self.disks.values()], "exports": self.export_urls(),
                **(self.services.status() if self.services else {})}
