"""The head daemon: composes members (nbd client), the RAID5 array (raid5),
the volume pool (head.volumes), the head's own NBD exports, the mounted
filesystems (head.mount), jobs and the REST API.

Start order (the seed's 1.8.2): connect the members, assemble (or create,
when the config asks and every member is blank), open (or, on a fresh array,
format) the pool, create missing volumes, export volumes and snapshots over
NBD, mount each volume's ext4, start the member watcher and the API. Stop
runs the same steps backwards; every step is bounded.

Threads: all array and pool work runs on the head's event loop. Mounting,
unmounting and fsfreeze block in the kernel on I/O that this very loop must
serve (ext4 -> loop -> nbdfuse -> our NBD server), so they always run in
executor threads, never on the loop.

Durability: an fsync on a mounted volume reaches the volume as an NBD FLUSH;
the volume commits its mapping and flushes the array, which flushes every
member. Only then is the fsync acknowledged.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from opie.head import backup as head_backup
from opie.head.api import APIServer
from opie.head.cluster import Cluster
from opie.head.errors import HeadError
from opie.head.exports import SNAPSHOT_SEP, snapshot_export
from opie.head.ha.service import HAService
from opie.head.fileservice import FileService, FileServiceConfig
from opie.head.mount import Mount, cleanup_stale, release_shared_root
from opie.head import config as head_config
from opie.head import fsfreeze
from opie.head.config import HeadConfig
from opie.head.jobs import Job, Jobs
from opie.head.members import MemberWatcher, connect_all
from opie.head.volumes import NotFoundError, Pool, ValidationError
from opie.head.volumes import IntegrityError as PoolIntegrityError, UnsupportedVersion
from opie.nbd import tls
from opie.netaddr import parse_host_port
from opie.nbd.server import NBDServer, TLSMode
from opie.raid5 import assemble as raid5_assemble
from opie.raid5 import scrub as raid5_scrub
from opie.raid5.errors import AssemblyError
from opie.raid5.superblock import Superblock

log = logging.getLogger(__name__)

TOKEN_FILE = "api-token"


async def _probe(member) -> str:
    """'blank' (all zeros where a superblock would be), 'member', or 'foreign'."""
    head = await member.read(0, 4096)
    if not any(head):
        return "blank"
    try:
        Superblock.from_bytes(head)
        return "member"
    except Exception:
        return "foreign"


class Head:
    def __init__(self, state_dir: str | os.PathLike, cfg: HeadConfig):
        self.state_dir = Path(state_dir)
        self.cfg = cfg
        for name, host in cfg.plain_network_listeners():   # validated: only with insecure
            tls.vet_plain_listener(f"{name} {getattr(cfg, name)}", host, insecure=cfg.insecure)
        self.client_tls = tls.client_context(cfg.tls_dir) if cfg.tls_dir else None
        self.server_tls = tls.server_context(cfg.tls_dir) if cfg.tls_dir else None
        self.clients: list = []
        self.array = None
        self.pool: Pool | None = None
        self.nbd: NBDServer | None = None
        self.nbd_addr: tuple[str, int] | None = None
        self.nbd_socket: str | None = None
        self.mounts: dict[str, Any] = {}  # export name -> head.mount.Mount
        self.watcher: MemberWatcher | None = None
        self.jobs = Jobs()
        self.api = None
        self.cluster = None  # head.cluster.Cluster when discovery is on
        self.ha: HAService | None = None  # with the config's `ha` section (head.ha.service)
        self.epoch: int | None = None  # the epoch member connections are bound to (HA), None: single head
        self.stopping: asyncio.Event | None = None  # set by run(): a start waiting for members gives up
        self._scheduler: asyncio.Task | None = None
        self.files = None  # head.fileservice.FileService when shares are enabled
        self.started = time.time()
        self.token = self._token()

    # ------------------------------------------------------------ lifecycle
    def _token(self) -> str:
        path = self.state_dir / TOKEN_FILE
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        token = path.read_text().strip()
        if not token:  # refused before anything starts (the API refuses it too)
            raise head_config.ConfigError(f"api-token: the head's API token in {self.state_dir} is empty; "
                                          f"delete {path} and the head makes a new one")
        return token

    async def start(self) -> None:
        """Single head (no `ha` section): serve at once, as the one active head.
        With `ha`: the API comes up, then the head joins the election PASSIVE;
        the HA service (head.ha.service) runs the serving steps below when it
        wins, and stops them when it is demoted."""
        cfg = self.cfg
        left = await asyncio.get_running_loop().run_in_executor(
            None, cleanup_stale, str(self.state_dir / "run"), cfg.mount_root)
        if left:
            log.warning("cleaned up after an unclean stop: %s", "; ".join(left))
        await self._start_cluster()
        if cfg.ha is not None:
            self._start_api()
            self.ha = HAService(self, cfg.ha)
            await self.ha.start()
            return
        await self.connect_members()
        fresh = await self.assemble()
        await self.open_pool(fresh)
        await self.start_exports()
        await self.start_files()
        self._start_api()
        if cfg.backups:
            self._scheduler = asyncio.ensure_future(self._backup_schedule())

    def _start_api(self) -> None:
        if self.api is None:  # already up when members came from discovery
            self.api = APIServer(self, *_split(self.cfg.api_listen))
            self.api.start()

    # ------------------------------------------------------------ serving steps (start order)
    async def connect_members(self, epoch: int | None = None, skip: frozenset[str] = frozenset()) -> None:
        """Connect every member (None in place of one unreachable, or listed in
        `skip`), each connection bound to `epoch` (HA) or to none."""
        self.epoch = epoch
        wanted = [u for u in self.cfg.members if u not in skip]
        found = dict(zip(wanted, await connect_all(wanted, self.client_tls, io_thread=self.cfg.member_io_thread,
                                                   epoch=epoch)))
        self.clients = [found.get(u) for u in self.cfg.members]

    async def assemble(self) -> bool:
        """Assemble the array from the connected members (resyncing only its
        dirty regions), or create it when the config asks and every member is
        blank. True when the array is new."""
        cfg = self.cfg
        present = [c for c in self.clients if c is not None]
        kinds = await asyncio.gather(*(_probe(c) for c in present))
        if present and all(k == "blank" for k in kinds):
            if not cfg.create_array:
                raise HeadError("every member is blank; set create_array to create the array")
            if len(present) != len(cfg.members):
                raise HeadError(f"creating an array needs every member; "
                                f"{len(cfg.members) - len(present)} unreachable")
            self.array = await raid5_assemble.create(present, chunk_size=cfg.chunk_size, name=cfg.name,
                                                     assume_clean=cfg.assume_clean)
            fresh = True
        else:
            foreign = [c.name for c, k in zip(present, kinds) if k == "foreign"]
            if foreign:
                raise HeadError(f"not Opie RAID5 members (refusing to touch them): {', '.join(foreign)}")
            members = [c for c, k in zip(present, kinds) if k == "member"]
            try:
                self.array = await raid5_assemble.assemble(members, name=cfg.name, rate=cfg.rebuild_rate)
            except AssemblyError as exc:
                raise HeadError(f"cannot assemble the array: {exc}") from None
            fresh = False
        log.info("array %s: %s", cfg.name, self.array.state_string())
        return fresh

    async def open_pool(self, fresh: bool) -> None:
        """Open (or, on a new array, format) the pool; create missing configured volumes."""
        try:
            self.pool = await (Pool.format(self.array) if fresh else Pool.open(self.array))
        except UnsupportedVersion as exc:
            raise HeadError(f"the volumes on the array use another format; nothing was changed: {exc}") from None
        except PoolIntegrityError as exc:
            raise HeadError(f"volume metadata on the array is damaged: {exc}") from None
        existing = {v.name for v in self.pool.list_volumes()}
        for spec in self.cfg.volumes:
            if spec.name not in existing:
                await self.pool.create_volume(spec.name, spec.size)
                log.info("created volume %s (%d bytes)", spec.name, spec.size)

    async def start_exports(self) -> None:
        """Export every volume and snapshot over NBD; start the member watcher."""
        cfg = self.cfg
        exports = {v.name: self.pool.open_volume(v.name) for v in self.pool.list_volumes()}
        for s in self.pool.list_snapshots():
            exports[snapshot_export(s.volume, s.name)] = self.pool.open_snapshot(s.volume, s.name)
        self.nbd = NBDServer(exports, tls_context=self.server_tls,
                             tls_mode=TLSMode.REQUIRE if self.server_tls else TLSMode.OFF)
        host, port = _split(cfg.nbd_listen)
        self.nbd_addr = await self.nbd.start(host, port)
        # The head's own mounts reach the exports over a 0600 Unix socket: no
        # TLS needed on the local path, and nbdfuse cannot load certificates.
        self.nbd_socket = await self.nbd.start_unix(str(self.state_dir / "nbd.sock"))
        self.watcher = MemberWatcher(self.array, cfg.members, self.client_tls, rate=cfg.rebuild_rate,
                                     io_thread=cfg.member_io_thread, epoch=self.epoch)
        self.watcher.start()

    async def start_files(self) -> None:
        """Mount each configured volume's ext4; start the share servers if enabled."""
        cfg = self.cfg
        for spec in cfg.volumes:
            await self.mount(spec.name)
        if cfg.shares.get("enabled"):
            try:
                fs_cfg = FileServiceConfig.from_dict(cfg.shares)
            except (TypeError, ValueError) as exc:
                raise HeadError(f"head config: {exc}") from None
            self.files = FileService(self, fs_cfg)
            await self.files.start()

    async def stop(self) -> None:
        """Unmount, stop exports, close the pool and the array cleanly (with HA:
        then leave the election, releasing the service address)."""
        if self.api:
            self.api.stop()
        await self._stop_cluster()
        if self.ha is not None:
            await self.ha.stop()
        else:
            await self.stop_serving()
        log.info("head %s stopped", self.cfg.name)

    # ------------------------------------------------------------ serving steps (stop order)
    async def stop_writing(self) -> None:
        """A demoted head's first step: no request reaches an ISU after this
        returns (the watcher stopped, every member connection dropped at once,
        pending requests failed). Idempotent."""
        if self.watcher:
            await self.watcher.stop()
            self.watcher = None
        members = [c for c in self.clients if c is not None]
        if self.array is not None:
            members += [s.member for s in self.array.slots if s.member is not None and s.member not in members]
        await asyncio.gather(*(m.abort() for m in members), return_exceptions=True)

    async def stop_serving(self, *, after_abort: bool = False) -> None:
        """Stop what the serving steps started, in reverse: jobs, shares,
        mounts, watcher, exports, pool, array, members. Cleanly (pool and array
        flushed, superblocks clean) unless `after_abort` (stop_writing ran: what
        cannot reach the members any more is logged and dropped). Idempotent."""
        if self._scheduler:
            self._scheduler.cancel()
            self._scheduler = None
        await self.jobs.cancel_all()
        if self.files:
            await self.files.stop()
            self.files = None
        for name in sorted(self.mounts, key=lambda n: SNAPSHOT_SEP not in n):  # snapshots first
            try:
                await self.unmount(name)
            except HeadError as exc:
                log.error("%s", exc)
        for root in (str(self.state_dir / "run"), self.cfg.mount_root):
            await asyncio.get_running_loop().run_in_executor(None, release_shared_root, root)
        if self.watcher:
            await self.watcher.stop()
            self.watcher = None
        if self.nbd:
            await self.nbd.close()
            self.nbd = None
        for what, close in (("pool", self.pool and self.pool.close), ("array", self.array and self.array.stop)):
            if not close:
                continue
            try:
                await close()
            except Exception as exc:
                if not after_abort:
                    raise
                log.info("%s not closed cleanly after the members were dropped: %s", what, exc)
        self.pool = self.array = None
        for c in self.clients:
            if c is not None:
                await c.close()
        self.clients = []

    # ------------------------------------------------------------ discovery (head/cluster.py)
    async def _start_cluster(self) -> None:
        """With `discover`: lease server and ISU registry; with no members in the config,
        the API comes up first (ISUs are adopted through it) and the members are found
        by discovery (kept in memory only: the next boot discovers them again)."""
        if not self.cfg.discover:
            return
        loop = asyncio.get_running_loop()
        self.cluster = Cluster(self)
        await loop.run_in_executor(None, self.cluster.start)
        if not self.cfg.members:
            self.api = APIServer(self, *_split(self.cfg.api_listen))
            self.api.start()
            self.cfg.members = await self.cluster.member_uris()
            self.cfg.discovered_members = True

    async def _stop_cluster(self) -> None:
        if self.cluster is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.cluster.close)
            self.cluster = None

    # ------------------------------------------------------------ addresses
    def export_uri(self, export: str) -> str:
        host, port = self.nbd_addr
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"{'nbds' if self.server_tls else 'nbd'}://{host}:{port}/{export}"

    # ------------------------------------------------------------ mounts
    async def mount(self, export: str, mountpoint: str | None = None, read_only: bool = False) -> dict:
        if export in self.mounts:
            return self.mounts[export].status()
        m = Mount(f"nbd+unix:///{export}?socket={self.nbd_socket}", mountpoint or self.cfg.mountpoint(export),
                  read_only=read_only, mkfs=not read_only,
                  bind_root=self.cfg.mount_root, runtime_dir=str(self.state_dir / "run"))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, m.up)
        self.mounts[export] = m
        log.info("mounted %s at %s%s", export, m.mountpoint, " (read-only)" if read_only else "")
        if self.files and SNAPSHOT_SEP not in export:
            await self.files.after_mount(export)
        return m.status()

    async def unmount(self, export: str) -> None:
        """Unmount; a mount still busy stays known (and raises) so a later
        call can finish it."""
        m = self.mounts.get(export)
        if m is None:
            return
        if self.files and SNAPSHOT_SEP not in export:
            await self.files.before_unmount(export)
        try:
            await asyncio.get_running_loop().run_in_executor(None, m.down)
        except OSError as exc:
            raise HeadError(f"cannot unmount {export}: {exc}") from None
        del self.mounts[export]

    # ------------------------------------------------------------ volumes
    async def create_volume(self, name: str, size: int) -> dict:
        """A new thin volume, exported at once (not mounted: mount it to get ext4)."""
        try:
            info = await self.pool.create_volume(name, size)
        except ValidationError as exc:
            raise HeadError(str(exc), 400) from None
        self.nbd.exports[name] = self.pool.open_volume(name)
        return {"name": info.name, "size": info.size, "export": self.export_uri(name)}

    async def delete_volume(self, name: str, recursive: bool = False) -> None:
        self._need_volume(name)
        if name in self.mounts:
            raise HeadError(f"volume {name} is mounted; unmount it first")
        if any(spec.name == name for spec in self.cfg.volumes):
            raise HeadError(f"volume {name} is in the head configuration; remove it there first")
        snaps = [s.name for s in self.pool.list_snapshots(name)]
        if snaps and not recursive:
            raise HeadError(f"volume {name} has snapshots ({', '.join(snaps)}); delete them or ask recursive")
        for s in snaps:
            await self.delete_snapshot(name, s)
        await self.nbd.remove_export(name)  # ends the sessions open on it
        await self.pool.delete_volume(name)

    # ------------------------------------------------------------ snapshots
    async def create_snapshot(self, volume: str, name: str) -> dict:
        """Freeze the volume's filesystem (if mounted), snapshot, thaw. The
        snapshot is then exported read-only as VOLUME@NAME."""
        self._need_volume(volume)
        m = self.mounts.get(volume)
        loop = asyncio.get_running_loop()
        try:
            if m is not None:
                await loop.run_in_executor(None, fsfreeze.freeze, m.mountpoint)
            try:
                info = await self.pool.create_snapshot(volume, name)
            finally:
                if m is not None:
                    await loop.run_in_executor(None, fsfreeze.thaw, m.mountpoint)
        except ValidationError as exc:
            raise HeadError(str(exc), 400) from None
        except OSError as exc:
            raise HeadError(f"snapshot {volume}@{name} failed: {exc}") from None
        export = snapshot_export(volume, name)
        self.nbd.exports[export] = self.pool.open_snapshot(volume, name)
        log.info("snapshot %s taken", export)
        if self.files:
            await self.files.snapshot_added(volume, name, info.created)
        return {**_snap_json(info), "export": self.export_uri(export)}

    async def delete_snapshot(self, volume: str, name: str) -> None:
        export = snapshot_export(volume, name)
        if self.files:
            await self.files.snapshot_removed(export)
        await self.unmount(export)
        await self.nbd.remove_export(export)  # ends the sessions open on it
        try:
            await self.pool.delete_snapshot(volume, name)
        except NotFoundError as exc:
            raise HeadError(str(exc), 404) from None
        log.info("snapshot %s deleted", export)

    def _need_volume(self, volume: str) -> None:
        if volume not in {v.name for v in self.pool.list_volumes()}:
            raise HeadError(f"no volume named {volume!r}", 404)

    # ------------------------------------------------------------ array
    def start_scrub(self) -> Job:
        async def work(job: Job) -> dict:
            report = await raid5_scrub.scrub(self.array)
            return {"checked": report.checked, "repaired": report.repaired,
                    "unrecoverable": report.unrecoverable, "mismatches": report.mismatches,
                    "by_member": dict(report.by_member),
                    "bad": [{"member": m, "stripe": s, "block": b} for m, s, b in report.bad[:1000]],
                    "summary": report.summary()}
        try:
            return self.jobs.start("scrub", self.cfg.name, work)
        except RuntimeError as exc:
            raise HeadError(str(exc)) from None

    # ------------------------------------------------------------ backups
    def start_backup(self, volume: str, to: str, keep_snapshot: bool = False, full: bool = False) -> Job:
        self._need_volume(volume)

        async def work(job: Job) -> dict:
            try:
                return await head_backup.backup(self, volume, to, keep_snapshot=keep_snapshot, full=full, job=job)
            except head_backup.BackupError as exc:
                raise HeadError(str(exc)) from None
        try:
            return self.jobs.start("backup", f"{volume} -> {to}", work)
        except RuntimeError as exc:
            raise HeadError(str(exc)) from None

    def start_restore(self, volume: str, src: str, snapshot: str | None = None) -> Job:
        self._need_volume(volume)

        async def work(job: Job) -> dict:
            return await head_backup.restore(self, volume, src, job=job)
        try:
            return self.jobs.start("restore", f"{src} -> {volume}", work)
        except RuntimeError as exc:
            raise HeadError(str(exc)) from None

    async def _backup_schedule(self) -> None:
        """Run each configured backup every `every` seconds (first one after
        one period); a run that fails is logged and retried next period."""
        due = {i: time.monotonic() + b.every for i, b in enumerate(self.cfg.backups)}
        while True:
            await asyncio.sleep(min(5.0, min(b.every for b in self.cfg.backups) / 4))
            now = time.monotonic()
            for i, b in enumerate(self.cfg.backups):
                if now >= due[i]:
                    due[i] = now + b.every
                    try:
                        self.start_backup(b.volume, b.to, b.keep_snapshot)
                    except HeadError as exc:
                        log.error("scheduled backup of %s to %s not started: %s", b.volume, b.to, exc)

    # ------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        arr = self.array.status()
        for kind, phase in self.array.phases.items():
            arr.setdefault("progress", {})[kind.value] = {
                "state": phase.state.value, "done": phase.done, "total": phase.total,
                "fraction": round(phase.progress, 4)}
        space = self.pool.space()
        volumes = []
        for v in self.pool.list_volumes():
            m = self.mounts.get(v.name)
            volumes.append({"name": v.name, "size": v.size, "mapped_bytes": v.mapped_bytes,
                            "export": self.export_uri(v.name),
                            "mountpoint": m.mountpoint if m else None,
                            "filesystem": m.status() if m else None,
                            "snapshots": [_snap_json(s) for s in self.pool.list_snapshots(v.name)]})
        for job in self.jobs.jobs.values():
            if job.kind == "scrub" and job.state.value == "running":
                arr["scrub_job"] = job.id
        out = {"head": {"name": self.cfg.name, "role": self.role, "pid": os.getpid(),
                        "uptime": round(time.time() - self.started, 1),
                        "nbd": self.export_uri("")[:-1]},
               "array": arr,
               "pool": {k: getattr(space, k) for k in space.__dataclass_fields__},
               "volumes": volumes,
               "jobs": [j.to_json() for j in self.jobs.jobs.values()]}
        if self.ha is not None:
            out["ha"] = self.ha.status()
        return out

    @property
    def role(self) -> str:
        """'active' or 'passive': the election's word with HA, else the config's."""
        return self.ha.role if self.ha is not None else self.cfg.role


def _snap_json(info) -> dict:
    return {k: getattr(info, k) for k in info.__dataclass_fields__}


def _split(addr: str) -> tuple[str, int]:
    return parse_host_port(addr, default_host="127.0.0.1", allow_port_zero=True)


async def run(state_dir: str) -> int:
    """Run the head until SIGTERM/SIGINT. Prints one JSON ready line."""
    import signal  # noqa: PLC0415
    cfg = head_config.load(state_dir)
    head = Head(state_dir, cfg)
    stop = head.stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await head.start()
    except BaseException:
        await head.stop()
        raise
    ready = {"event": "ready", "name": cfg.name, "pid": os.getpid(), "api": head.api.url,
             "token_file": str(head.state_dir / TOKEN_FILE), "role": head.role}
    if head.ha is None:  # an HA head starts passive: it serves nothing until it wins the election
        ready.update({"nbd": list(head.nbd_addr), "array": head.array.state_string(),
                      "volumes": [{"name": v.name, "export": head.export_uri(v.name),
                                   "mountpoint": head.mounts[v.name].mountpoint if v.name in head.mounts
                                   else None} for v in head.pool.list_volumes()]})
    print(json.dumps(ready), flush=True)
    await stop.wait()
    await head.stop()
    return 0
