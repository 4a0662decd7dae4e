"""Lifecycle of smbd as a child process (the lab; systemd hosts use shares.systemd),
and `SmbKind`, the SMB entry of the share-kind registry.

smbd runs as `smbd --foreground --debug-stdout -s CONF` in its own process
group (smbd makes one; never `--no-process-group`, with which SIGTERM hits
the caller's whole group). Config changes go through
`smbcontrol <pid> reload-config`, so connected clients keep their sessions.
smbd starts `samba-dcerpcd` on demand; it outlives smbd and is stopped by
its pid file, as are the `rpcd_*` helpers it leaves behind.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

from opie.shares.base import ServerRunner, ShareKind
from opie.shares.errors import CallError
from opie.fileio import atomic_write
from opie.shares.model import Protocol, ShareTable
from opie.shares.process import (Child, Launcher, ServerProcess, cmdline, pid_alive, run, stop_pid,
                            stop_pidfile, tcp_open, wait_for)
from opie.shares.smb import STATE_SUBDIRS, SmbSettings, render

log = logging.getLogger(__name__)


def write_config(settings: SmbSettings, table: ShareTable) -> Path:
    """Create the state dirs and (re)write smb.conf for `table`; returns its path.

    Share paths are resolved and re-checked here (`ShareTable.resolved`):
    ValidationErrors, and smb.conf unchanged, if one now leads out of its volume."""
    text = render(table.resolved(), settings)
    for sub in STATE_SUBDIRS:
        Path(settings.state_dir, sub).mkdir(parents=True, exist_ok=True)
    os.chmod(Path(settings.state_dir, "private"), 0o700)
    atomic_write(settings.conf_path, text)
    return settings.conf_path


def rpc_helper_pids(settings: SmbSettings) -> list[int]:
    """Pids of samba-dcerpcd and rpcd_* processes started for this smb.conf."""
    conf = str(settings.conf_path)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name))
        if argv and any(conf in arg for arg in argv) and \
                any(name in argv[0] for name in ("samba-dcerpcd", "rpcd_")):
            pids.append(int(entry.name))
    return pids


class SmbdRunner(ServerRunner):
    """smbd for one `SmbSettings`: start(table), apply(table), stop()."""

    def __init__(self, settings: SmbSettings, start_timeout: float = 30.0,
                 launcher: Launcher = Child) -> None:
        self.settings = settings.validate()
        self.start_timeout = start_timeout
        self.launcher = launcher
        self.child: ServerProcess | None = None

    def start(self, table: ShareTable) -> None:
        """Write smb.conf, start smbd and return once it accepts connections."""
        if self.running:
            raise CallError(f"smbd: already running as pid {self.pid}", errno.EEXIST)
        conf = write_config(self.settings, table)
        self.child = self.launcher("smbd", ["smbd", "--foreground", "--debug-stdout", "-s",
                                            str(conf)],
                                   Path(self.settings.state_dir, "log", "smbd.stdout"), None)
        self.child.start()
        try:
            wait_for(lambda: tcp_open(self.settings.bind_address, self.settings.port),
                     self.start_timeout, "smbd", alive=lambda: self.running)
        except CallError as exc:
            tail = self.child.log_tail()
            self.stop()
            raise CallError(f"{exc}\n{tail}", exc.errno) from exc
        log.info("smbd: serving %d shares on %s:%d", len(table.smb_shares()),
                 self.settings.bind_address, self.settings.port)

    def apply(self, table: ShareTable) -> None:
        """Rewrite smb.conf and tell the running smbd (and its connections) to reload it."""
        conf = write_config(self.settings, table)
        if not self.running or self.pid is None:
            raise CallError("smbd: not running", errno.ESRCH)
        run(["smbcontrol", f"--configfile={conf}", str(self.pid), "reload-config"],
            "smbd reload-config")
        log.info("smbd: reloaded config, %d shares", len(table.smb_shares()))

    def stop(self) -> None:
        """Stop smbd, then samba-dcerpcd and its rpcd_* helpers, each by pid."""
        if self.child is not None:
            self.child.stop()
        stop_pidfile(self.settings.pid_dir / "samba-dcerpcd.pid", "samba-dcerpcd",
                     "samba-dcerpcd")
        for pid in rpc_helper_pids(self.settings):
            stop_pid(pid, "samba rpc helper")
        wait_for(lambda: not any(pid_alive(p) for p in rpc_helper_pids(self.settings)),
                 10, "samba helpers to exit")


class SmbKind(ShareKind):
    """SMB through smbd: smb.conf from `shares.smb`, the server from `SmbdRunner`."""

    protocol = Protocol.SMB
    settings: SmbSettings

    def render(self, table: ShareTable) -> str:
        return render(table, self.settings)

    def runner(self, **options: Any) -> ServerRunner:
        return SmbdRunner(self.settings, **options)
