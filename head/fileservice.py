"""The head's file service: SMB and NFS shares of its mounted volumes, and
"Previous Versions" from its snapshots.

Owns:
- the shares file (STATE/shares/shares.json, `shares.store` format) holding the
  share definitions; the volume -> mountpoint map is the head's, not the file's;
- a `shares.service.ShareService` running smbd and ganesha.nfsd as children,
  with their state under STATE/shares/smb and STATE/shares/nfs (the same
  place `opie user --state-dir STATE/shares` keeps Samba's passdb);
- read-only mounts of snapshots at VOLUME/.snapshots/@GMT-YYYY.MM.DD-HH.MM.SS
  (Samba's shadow_copy2 layout) for volumes with a share that asks for
  previous versions.

Every call that runs smbd/ganesha tools or touches a mounted filesystem runs
in an executor thread: those block on I/O the head's own loop serves.
A change is validated as a whole before anything is touched; a rejected
change leaves the file and the running servers as they were.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opie.head.exports import snapshot_export
from opie.shares import clients as share_clients
from opie.shares import snapshots as share_snapshots
from opie.shares.errors import CallError, ValidationErrors
from opie.shares.model import Protocol, Share, ShareTable
from opie.shares.nfs import NfsSettings
from opie.shares.service import ShareService
from opie.shares.smb import SmbSettings
from opie.shares.store import load_table, save_table

log = logging.getLogger(__name__)


@dataclass
class FileServiceConfig:
    """`shares` section of head.json."""

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    smb_port: int = 445
    nfs_port: int = 2049

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FileServiceConfig":
        cfg = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        for name in ("smb_port", "nfs_port"):
            v = getattr(cfg, name)
            if not isinstance(v, int) or not 0 < v < 65536:
                raise ValueError(f"shares.{name}: expected a port number, got {v!r}")
        return cfg


class FileService:
    def __init__(self, head, cfg: FileServiceConfig):
        self.head = head
        self.paused: set[str] = set()  # volumes being unmounted: their shares are not served
        self.cfg = cfg
        self.dir = head.state_dir / "shares"
        self.path = self.dir / "shares.json"
        self.smb = SmbSettings(state_dir=str(self.dir / "smb"), port=cfg.smb_port, bind_address=cfg.bind_address)
        self.nfs = NfsSettings(state_dir=str(self.dir / "nfs"), port=cfg.nfs_port, bind_address=cfg.bind_address)
        self.service: ShareService | None = None
        self.snapshot_mounts: dict[str, str] = {}  # snapshot export -> mountpoint

    # ------------------------------------------------------------ helpers
    def _volumes(self) -> dict[str, str]:
        return {name: m.mountpoint for name, m in self.head.mounts.items()
                if name in self._volume_names() and name not in self.paused}

    def _volume_names(self) -> set[str]:
        return {v.name for v in self.head.pool.list_volumes()}

    def table(self) -> ShareTable:
        """Every defined share, with the volumes mounted now."""
        stored = load_table(self.path)
        return ShareTable(self._volumes(), stored.shares)

    def served(self) -> ShareTable:
        """The shares whose volume is mounted: what the servers publish."""
        table = self.table()
        return ShareTable(table.volumes, tuple(s for s in table.shares if s.volume in table.volumes))

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ------------------------------------------------------------ lifecycle
    def _stop_leftovers(self) -> list[int]:
        """Servers a crashed head left running (smbd, samba-dcerpcd, ganesha,
        their dbus-daemon): every process whose command line names our state
        dir, found in /proc and stopped by pid."""
        from opie.shares.process import cmdline, stop_pid  # noqa: PLC0415
        mine = str(self.dir)
        stopped = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            if any(mine in arg for arg in cmdline(pid)):
                stop_pid(pid, "leftover share server")
                stopped.append(pid)
        self.service.stop()  # pid-file helpers such as samba-dcerpcd
        return stopped

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.service = ShareService({Protocol.SMB: self.smb, Protocol.NFS: self.nfs})
        left = await self._run(self._stop_leftovers)
        if left:
            log.warning("stopped share servers left by an unclean stop: pids %s", left)
        served = self.served()  # shares of unmounted volumes stay in the file, unserved
        await self._run(self.service.start, served)
        for s in self.head.pool.list_snapshots():
            await self.snapshot_added(s.volume, s.name, s.created)
        log.info("file service: smbd on %s:%d, ganesha on %s:%d, %d share(s)", self.cfg.bind_address,
                 self.cfg.smb_port, self.cfg.bind_address, self.cfg.nfs_port, len(served.shares))

    async def stop(self) -> None:
        for export in list(self.snapshot_mounts):
            await self._unmount_snapshot(export)
        if self.service:
            await self._run(self.service.stop)

    # ------------------------------------------------------------ shares
    def list(self) -> list[dict[str, Any]]:
        return [s.to_dict() if hasattr(s, "to_dict") else s.__dict__ for s in load_table(self.path).shares]

    async def add(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Validate and apply one new share; raises ValidationErrors/CallError."""
        if not isinstance(fields.get("protocol", "smb"), str):
            raise ValidationErrors([("protocol", "expected smb, nfs or both")])
        try:
            share = Share.from_dict(fields)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValidationErrors([("share", str(exc))]) from None
        table = self.table()
        if table.get(share.name) is not None:
            raise ValidationErrors([("name", f"share {share.name!r} already exists")])
        if share.volume not in table.volumes:
            raise ValidationErrors([("volume", f"volume {share.volume!r} is not mounted on this head")])
        new = table.with_share(share)
        await self._apply(new)
        if share.previous_versions:
            for s in self.head.pool.list_snapshots(share.volume):
                await self.snapshot_added(s.volume, s.name, s.created)
        return new.get(share.name).to_dict()

    async def delete(self, name: str) -> None:
        table = self.table()
        if table.get(name) is None:
            raise ValidationErrors([("name", f"no share named {name!r}")])
        await self._apply(table.without_share(name))

    async def _apply(self, table: ShareTable) -> None:
        """Validate the whole table, save it, and serve the part whose volume is mounted."""
        self.service.check(table)
        served = ShareTable(table.volumes, tuple(s for s in table.shares if s.volume in table.volumes))
        await self._run(self.service.apply, served)
        save_table(self.path, table)

    # ------------------------------------------------------------ previous versions
    def _wants_versions(self, volume: str) -> bool:
        return any(s.previous_versions and s.volume == volume for s in load_table(self.path).shares)

    async def snapshot_added(self, volume: str, name: str, created: float) -> None:
        """Mount the snapshot read-only where shadow_copy2 looks, if a share of
        the volume shows previous versions."""
        export = snapshot_export(volume, name)
        if volume not in self.head.mounts or export in self.snapshot_mounts or not self._wants_versions(volume):
            return
        taken = dt.datetime.fromtimestamp(created, dt.timezone.utc)
        where = share_snapshots.snapshot_dir(self.head.mounts[volume].mountpoint, taken)
        await self._run(lambda: Path(where).mkdir(parents=True, exist_ok=True))
        await self.head.mount(export, str(where), read_only=True)
        self.snapshot_mounts[export] = str(where)
        log.info("previous version %s of %s at %s", name, volume, where)

    async def snapshot_removed(self, export: str) -> None:
        await self._unmount_snapshot(export)

    async def _unmount_snapshot(self, export: str) -> None:
        where = self.snapshot_mounts.pop(export, None)
        if where is None:
            return
        await self.head.unmount(export)
        try:
            await self._run(Path(where).rmdir)
        except OSError:
            pass

    async def before_unmount(self, volume: str) -> None:
        """Stop serving the volume's shares (the servers hold its files open)
        and unmount its previous versions, so the volume can be unmounted."""
        prefix = f"{volume}@"
        for export in [e for e in self.snapshot_mounts if e.startswith(prefix)]:
            await self._unmount_snapshot(export)
        self.paused.add(volume)
        await self._run(self.service.apply, self.served())

    async def after_mount(self, volume: str) -> None:
        self.paused.discard(volume)
        await self._run(self.service.apply, self.served())
        for s in self.head.pool.list_snapshots(volume):
            await self.snapshot_added(s.volume, s.name, s.created)


def lab_clients(table: ShareTable, host: str, cfg: FileServiceConfig, user: str, password: str) -> list[dict]:
    return share_clients.describe(table, host, cfg.smb_port, cfg.nfs_port, user, password)


__all__ = ["CallError", "FileService", "FileServiceConfig", "ValidationErrors", "lab_clients"]
