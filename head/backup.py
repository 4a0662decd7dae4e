"""Backups of volumes: snapshot, copy (incremental from the mapping table),
verify, and restore.

A target is either a directory (it holds VOLUME.img, a sparse image, and
VOLUME.backup.json, the manifest) or an NBD export URI (nbd:// or nbds://;
its manifest then lives in the head's state dir under backups/).

Phases of a run (named, for progress): SNAPSHOT -> COPY -> VERIFY -> COMMIT
-> CLEANUP.
- SNAPSHOT: the head takes `backup-<target id>-<n>` with the filesystem frozen.
- COPY: with a manifest whose base snapshot still exists, only the ranges the
  mapping table says changed since that snapshot are copied; otherwise every
  allocated range is copied and the rest of the image is zeroed.
- VERIFY: every copied range is read back from the target and compared with
  the snapshot; the sha256 of each segment goes into the manifest.
- COMMIT: the manifest is written atomically (magic, version, checksum) only
  after the target was flushed: a crash before it leaves the previous manifest,
  and the next run repeats the increment.
- CLEANUP: the previous base snapshot is deleted; the new one stays as the base
  of the next increment (the only snapshot a target keeps) unless
  keep_snapshot, which keeps every one.

Restore copies the image back into a volume (unmounted for the duration),
then verifies every segment against the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from opie.fileio import atomic_write, pwrite_all
from opie.nbd import uri as nbd_uri

log = logging.getLogger(__name__)

MAGIC = "opie-backup"
VERSION = 1
COPY_CHUNK = 4 << 20


class BackupError(Exception):
    """The backup or restore cannot be done as asked; the target's last
    committed backup is unchanged."""


@dataclass
class Manifest:
    volume: str
    size: int
    segment_size: int
    snapshot: str           # the snapshot this image equals
    taken: float
    runs: int
    segments: dict[str, str]  # segment index -> sha256 hex of its bytes in the image

    def to_json(self) -> dict[str, Any]:
        body = {"volume": self.volume, "size": self.size, "segment_size": self.segment_size,
                "snapshot": self.snapshot, "taken": self.taken, "runs": self.runs,
                "segments": self.segments}
        raw = json.dumps(body, sort_keys=True).encode()
        return {"magic": MAGIC, "version": VERSION, "crc32": zlib.crc32(raw), "body": body}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "Manifest":
        if not isinstance(obj, dict) or obj.get("magic") != MAGIC:
            raise BackupError(f"{where}: expected magic {MAGIC!r}, got {obj.get('magic') if isinstance(obj, dict) else '?'!r}")
        if obj.get("version") != VERSION:
            raise BackupError(f"{where}: expected version {VERSION}, got {obj.get('version')!r}")
        raw = json.dumps(obj.get("body"), sort_keys=True).encode()
        if zlib.crc32(raw) != obj.get("crc32"):
            raise BackupError(f"{where}: manifest checksum: expected {obj.get('crc32')}, got {zlib.crc32(raw)}")
        return cls(**obj["body"])


def target_id(target: str) -> str:
    return hashlib.sha256(target.encode()).hexdigest()[:8]


class Target:
    """Where a backup image lives: a directory or an NBD export."""

    def __init__(self, target: str, volume: str, state_dir: Path, tls_dir: str | None):
        self.target = target
        self.volume = volume
        self.nbd = target.startswith(("nbd://", "nbds://"))
        if self.nbd:
            self.uri = nbd_uri.parse(target)
            self.manifest_path = state_dir / "backups" / f"{target_id(target)}-{volume}.backup.json"
        else:
            d = Path(target)
            if not d.is_dir():
                raise BackupError(f"backup target {target} is not a directory")
            self.image_path = d / f"{volume}.img"
            self.manifest_path = d / f"{volume}.backup.json"
        self.tls_dir = tls_dir
        self.dev = None
        self.fd = -1

    def manifest(self) -> Manifest | None:
        if not self.manifest_path.exists():
            return None
        try:
            obj = json.loads(self.manifest_path.read_text())
        except ValueError as exc:
            raise BackupError(f"{self.manifest_path}: not JSON: {exc}") from None
        return Manifest.from_json(obj, str(self.manifest_path))

    def write_manifest(self, m: Manifest) -> None:
        atomic_write(self.manifest_path, json.dumps(m.to_json()))

    async def open(self, size: int, create: bool) -> None:
        if self.nbd:
            from opie.nbd.client import NBDClient  # noqa: PLC0415
            self.dev = await NBDClient.connect(self.uri.host, self.uri.port, self.uri.export,
                                               tls_dir=self.tls_dir if self.uri.tls else None)
            if self.dev.size < size:
                raise BackupError(f"{self.target}: export of {self.dev.size} bytes is smaller than "
                                  f"the volume ({size} bytes)")
            return
        if not create and not self.image_path.exists():
            raise BackupError(f"no backup image {self.image_path}")
        self.fd = os.open(self.image_path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        if create and os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)

    async def read(self, offset: int, length: int) -> bytes:
        if self.dev is not None:
            return await self.dev.read(offset, length)
        return os.pread(self.fd, length, offset)

    async def write(self, offset: int, data: bytes) -> None:
        if self.dev is not None:
            return await self.dev.write(offset, data)
        pwrite_all(self.fd, data, offset)

    async def flush(self) -> None:
        if self.dev is not None:
            return await self.dev.flush()
        os.fsync(self.fd)

    async def close(self) -> None:
        if self.dev is not None:
            await self.dev.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def _copy_ranges(src, dst_write: Callable, ranges: list[tuple[int, int]], segment: int,
                       digests: dict[str, str], progress: Callable[[int], None]) -> int:
    """Copy `ranges` (segment-aligned) segment by segment; record sha256s."""
    copied = 0
    for off, length in ranges:
        end = off + length
        while off < end:
            n = min(segment - off % segment, end - off)
            data = await src.read(off, n)
            await dst_write(off, data)
            digests[str(off // segment)] = hashlib.sha256(data).hexdigest()
            copied += n
            off += n
            progress(copied)
    return copied


async def backup(head, volume: str, to: str, *, keep_snapshot: bool = False, full: bool = False,
                 job=None) -> dict[str, Any]:
    """Run one backup of `volume` to `to`. Returns counts for the admin."""
    pool = head.pool
    t = Target(to, volume, head.state_dir, head.cfg.tls_dir)
    old = t.manifest()
    snaps = {s.name for s in pool.list_snapshots(volume)}
    base = None
    if old and not full and old.volume == volume and old.snapshot in snaps and old.segment_size == pool.segment_size:
        base = old.snapshot
    run_no = (old.runs + 1) if old else 1
    name = f"backup-{target_id(to)}-{run_no}"
    while name in snaps:
        run_no += 1
        name = f"backup-{target_id(to)}-{run_no}"
    report = job.report if job else (lambda *_: None)
    report(0.0, f"snapshot {volume}@{name}")
    info = await head.create_snapshot(volume, name)
    size = info["size"]
    seg = pool.segment_size
    src = pool.open_snapshot(volume, name)
    try:
        if base:
            ranges = pool.changed_segments(volume, base, until=name)
            digests = dict(old.segments)
            kind = "incremental"
        else:
            ranges = pool.allocated_segments(volume, name)
            digests = {}
            kind = "full"
        total = sum(n for _, n in ranges) or 1
        await t.open(size, create=True)
        try:
            if kind == "full":
                # an image from an earlier, unrelated run must not keep stale bytes
                covered = set()
                for off, n in ranges:
                    covered.update(range(off // seg, -(-(off + n) // seg)))
                zero = bytes(seg)
                for i in range(-(-size // seg)):
                    if i not in covered:
                        n = min(seg, size - i * seg)
                        await t.write(i * seg, zero[:n])
                        digests[str(i)] = hashlib.sha256(zero[:n]).hexdigest()
            copied = await _copy_ranges(src, t.write, ranges, seg, digests,
                                        lambda c: report(0.8 * c / total, f"{kind}: {c} of {total} bytes"))
            await t.flush()
            report(0.8, "verifying")
            for off, length in ranges:  # VERIFY: read back what was copied
                at = off
                while at < off + length:
                    n = min(seg - at % seg, off + length - at)
                    got = hashlib.sha256(await t.read(at, n)).hexdigest()
                    if got != digests[str(at // seg)]:
                        raise BackupError(f"verify failed at offset {at}: target differs from snapshot")
                    at += n
        finally:
            await t.close()
        t.write_manifest(Manifest(volume, size, seg, name, info["created"], run_no, digests))
    except BaseException:
        await head.delete_snapshot(volume, name)  # the old base stays valid
        raise
    report(0.95, "cleanup")
    if not keep_snapshot and old and old.snapshot in snaps and old.snapshot != name:
        await head.delete_snapshot(volume, old.snapshot)
    segments = sum(-(-(off + n) // seg) - off // seg for off, n in ranges)
    log.info("backup of %s to %s: %s, %d segments (%d bytes) copied", volume, to, kind, segments, copied)
    return {"volume": volume, "target": to, "kind": kind, "snapshot": name, "base": base,
            "segments_copied": segments, "bytes_copied": copied, "volume_size": size,
            "manifest": str(t.manifest_path)}


async def restore(head, volume: str, src: str, *, job=None) -> dict[str, Any]:
    """Copy the backup image in `src` into `volume` and verify it. The volume
    is unmounted for the duration and mounted again afterwards."""
    pool = head.pool
    t = Target(src, volume, head.state_dir, head.cfg.tls_dir)
    m = t.manifest()
    if m is None:
        raise BackupError(f"no backup of {volume} in {src}")
    vols = {v.name: v for v in pool.list_volumes()}
    if volume not in vols:
        raise BackupError(f"no volume named {volume!r}")
    if vols[volume].size < m.size:
        raise BackupError(f"volume {volume} ({vols[volume].size} bytes) is smaller than the backup ({m.size})")
    report = job.report if job else (lambda *_: None)
    was_mounted = volume in head.mounts
    await head.unmount(volume)
    dev = pool.open_volume(volume)
    seg = m.segment_size
    await t.open(m.size, create=False)
    try:
        n_segs = -(-m.size // seg)
        for i in range(n_segs):
            n = min(seg, m.size - i * seg)
            await dev.write(i * seg, await t.read(i * seg, n))
            report(0.7 * (i + 1) / n_segs, f"restoring segment {i + 1} of {n_segs}")
        await dev.flush()
        for i in range(n_segs):
            n = min(seg, m.size - i * seg)
            got = hashlib.sha256(await dev.read(i * seg, n)).hexdigest()
            want = m.segments.get(str(i))
            if want is not None and got != want:
                raise BackupError(f"restore verify failed at segment {i}")
            report(0.7 + 0.3 * (i + 1) / n_segs, "verifying")
    finally:
        await t.close()
        if was_mounted:
            await head.mount(volume)
    return {"volume": volume, "source": src, "snapshot": m.snapshot, "bytes": m.size, "verified": True,
            "restored_at": time.time()}
