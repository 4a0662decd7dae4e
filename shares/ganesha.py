"""Lifecycle of ganesha.nfsd as a child process, exports changed over D-Bus, and
`NfsKind`, the NFS entry of the share-kind registry.

`start` writes ganesha.conf, starts a private dbus-daemon (unless given a
bus address), optionally rpcbind (NFSv3), then
`ganesha.nfsd -F -L LOG -f CONF -p PIDFILE`, all optionally inside a
network namespace (`ip netns exec NS`, which execs, so the pids are the
servers'). Share paths are resolved and re-checked each time ganesha.conf is
written (`ShareTable.resolved`). `apply` rewrites the config and then removes, re-adds and adds
exports one by one with ExportMgr.RemoveExport / AddExport: exports whose
block did not change are never touched, so their clients stay connected.
A changed export is removed and added again (its clients see a short
ESTALE window); Ganesha cannot update a Path in place.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

from opie.shares import dbus_bus
from opie.shares.base import ServerRunner, ShareKind
from opie.shares.errors import CallError
from opie.fileio import atomic_write
from opie.shares.model import Protocol, ShareTable
from opie.shares.nfs import NfsSettings, render, render_export
from opie.shares.process import Child, Launcher, ServerProcess, wait_for

log = logging.getLogger(__name__)

GANESHA_NAME = "org.ganesha.nfsd"
EXPORT_MGR_PATH = "/org/ganesha/nfsd/ExportMgr"
EXPORT_MGR = "org.ganesha.nfsd.exportmgr"


def listening(pid: int, port: int) -> bool:
    """True if the network namespace of `pid` has a TCP listener on `port`."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


class GaneshaRunner(ServerRunner):
    """ganesha.nfsd for one `NfsSettings`: start(table), apply(table), stop().

    `netns` runs every process in that network namespace; `rpcbind=True`
    starts a private rpcbind first (only sensible inside a namespace, since
    rpcbind owns port 111). `bus_address` uses an existing bus instead of a
    private dbus-daemon (on systemd hosts: the system bus). `launcher` makes
    the ganesha process: a child by default, a systemd unit with
    `shares.systemd.systemd_launcher`.
    """

    def __init__(self, settings: NfsSettings, netns: str | None = None, rpcbind: bool = False,
                 bus_address: str | None = None, start_timeout: float = 30.0,
                 launcher: Launcher = Child) -> None:
        self.settings = settings.validate()
        self.netns = netns
        self.want_rpcbind = rpcbind
        self.start_timeout = start_timeout
        self.state = Path(settings.state_dir)
        self.bus = None if bus_address else dbus_bus.PrivateBus(self.state / "dbus")
        self.bus_address = bus_address or (self.bus.address if self.bus else "")
        self.launcher = launcher
        self.child: ServerProcess | None = None
        self.rpcbind: Child | None = None
        self.exports: dict[int, str] = {}

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _render_exports(self, table: ShareTable) -> dict[int, str]:
        return {s.export_id or 0: render_export(s, table, self.settings)
                for s in table.nfs_shares()}

    def _export_mgr(self, member: str, signature: str = "", body: tuple = ()) -> list:
        return dbus_bus.call(self.bus_address, GANESHA_NAME, EXPORT_MGR_PATH, EXPORT_MGR,
                             member, signature, body)

    def show_exports(self) -> dict[int, str]:
        """Export id -> path of what the running Ganesha serves (id 0 is the pseudo root)."""
        body = self._export_mgr("ShowExports")
        return {int(entry[0]): str(entry[1]) for entry in body[1]}

    def _ready(self) -> bool:
        if self.pid is None or not listening(self.pid, self.settings.port):
            return False
        try:
            self.show_exports()
        except CallError:
            return False
        return True

    def start(self, table: ShareTable) -> None:
        """Write ganesha.conf and start the servers; returns once NFS and D-Bus answer."""
        if self.running:
            raise CallError(f"ganesha: already running as pid {self.pid}", errno.EEXIST)
        table = table.resolved()
        (self.state / "recovery").mkdir(parents=True, exist_ok=True)
        atomic_write(self.settings.conf_path, render(table, self.settings))
        try:
            if self.bus is not None:
                self.bus.start()
            if self.want_rpcbind:
                self.rpcbind = Child("rpcbind", self._prefix() + ["rpcbind", "-f"],
                                     self.state / "rpcbind.log")
                self.rpcbind.start()
                wait_for(lambda: self.rpcbind is not None and self.rpcbind.pid is not None
                         and listening(self.rpcbind.pid, 111), 10, "rpcbind",
                         alive=lambda: self.rpcbind is not None and self.rpcbind.alive)
            env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.bus_address)
            self.child = self.launcher("ganesha", self._prefix() + [
                "ganesha.nfsd", "-F", "-L", str(self.settings.log_path),
                "-f", str(self.settings.conf_path), "-p", str(self.settings.pid_path)],
                self.state / "ganesha.stdout", env)
            self.child.start()
            wait_for(self._ready, self.start_timeout, "ganesha", alive=lambda: self.running)
        except CallError as exc:
            tail = self.child.log_tail() if self.child else ""
            try:
                tail += "\n" + "\n".join(self.settings.log_path.read_text(
                    errors="replace").splitlines()[-10:])
            except OSError:
                pass
            self.stop()
            raise CallError(f"{exc}\n{tail}", exc.errno) from exc
        self.exports = self._render_exports(table)
        log.info("ganesha: serving %d exports on port %d", len(self.exports), self.settings.port)

    def apply(self, table: ShareTable) -> None:
        """Move the running Ganesha to `table`, touching only exports that changed."""
        if not self.running:
            raise CallError("ganesha: not running", errno.ESRCH)
        table = table.resolved()
        conf = self.settings.conf_path
        atomic_write(conf, render(table, self.settings))
        wanted = self._render_exports(table)
        gone = [i for i in self.exports if i not in wanted]
        changed = [i for i in wanted if i in self.exports and self.exports[i] != wanted[i]]
        added = [i for i in wanted if i not in self.exports]
        for export_id in gone + changed:
            self._export_mgr("RemoveExport", "q", (export_id,))
            del self.exports[export_id]
            log.info("ganesha: removed export %d", export_id)
        for export_id in changed + added:
            self._export_mgr("AddExport", "ss", (str(conf), f"EXPORT(Export_Id={export_id})"))
            self.exports[export_id] = wanted[export_id]
            log.info("ganesha: added export %d", export_id)

    def stop(self) -> None:
        """Stop ganesha, rpcbind and the private bus, each by pid; safe to repeat."""
        for child in (self.child, self.rpcbind):
            if child is not None:
                child.stop(timeout=20)
        if self.bus is not None:
            self.bus.stop()
        self.exports = {}


class NfsKind(ShareKind):
    """NFS through ganesha.nfsd: ganesha.conf from `shares.nfs`, the server from `GaneshaRunner`."""

    protocol = Protocol.NFS
    settings: NfsSettings

    def render(self, table: ShareTable) -> str:
        return render(table, self.settings)

    def runner(self, **options: Any) -> ServerRunner:
        return GaneshaRunner(self.settings, **options)
