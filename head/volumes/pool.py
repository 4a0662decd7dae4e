"""A pool of thin volumes and copy-on-write snapshots on one block device.

The pool owns the catalog (names, sizes, epochs), the segment mapping table,
the free-segment allocator and the crash-consistent metadata store; they sit
in a `core.PoolCore`, which it shares with the devices it opens. Every
management call (create, delete, resize, snapshot) is durable when it
returns. Volume writes dirty metadata only when they place a new segment;
`commit()` (a volume's flush, or a FUA write that placed one) makes data and
mapping durable, data first. All methods are loop-only.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import numpy as np

from opie.head.volumes.allocator import SegmentAllocator
from opie.head.volumes.catalog import Catalog, validate_name
from opie.head.volumes.core import CommitHook, MetadataCommit, PoolCore
from opie.head.volumes.devices import BlockDevice
from opie.head.volumes.errors import IntegrityError, NotFoundError, ValidationError
from opie.head.volumes.layout import Geometry
from opie.head.volumes.mapping import Chain, SegmentTable
from opie.head.volumes.metastore import MetaStore
from opie.head.volumes.model import (CheckReport, PoolSpace, SnapshotInfo, SnapshotState, VolumeInfo,
                                VolumeState)
from opie.head.volumes.records import KIND_SNAPSHOT, KIND_VOLUME, CatalogRecord
from opie.head.volumes.volume import SnapshotDevice, VolumeDevice, read_chain, write_locked

log = logging.getLogger(__name__)

DEFAULT_SEGMENT = 1 << 20
SECTOR = 512
FIRST_EPOCH = 1


def _validate_size(size: object) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % SECTOR:
        raise ValidationError("size", f"expected a positive multiple of {SECTOR}, got {size!r}")
    return size


class Pool:
    """Use `await Pool.format(device)` or `await Pool.open(device)`."""

    def __init__(self, core: PoolCore, volumes: dict[str, VolumeState]) -> None:
        self._core = core
        # the core's parts, which management uses throughout (never rebound)
        self._dev = core.device
        self._geo = core.geometry
        self._catalog = core.catalog
        self._table = core.table
        self._alloc = core.alloc
        self._volumes = volumes
        self._manage_lock = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------
    @classmethod
    async def format(cls, device: BlockDevice, *, segment_size: int = DEFAULT_SEGMENT,
                     max_entries: int = 1024, journal_blocks: int | None = None) -> Pool:
        """Make an empty pool on `device` (destroys what was there).

        `max_entries` bounds volumes + snapshots; `journal_blocks` defaults to
        room for two transactions that rewrite all metadata.
        """
        geo = Geometry.plan(device.size, segment_size, max_entries, journal_blocks)
        catalog = Catalog(geo.catalog_pages)
        table = SegmentTable(geo.segment_count, geo.catalog_pages, geo.blocks)
        pages = [catalog.page_image(p) for p in range(geo.catalog_pages)]
        pages += [table.page_image(geo.catalog_pages + i) for i in range(geo.table_pages)]
        store = await MetaStore.create(device, geo, pages)
        alloc = SegmentAllocator(table.build_index({}))
        return cls(PoolCore(device, store, catalog, table, alloc), {})

    @classmethod
    async def open(cls, device: BlockDevice) -> Pool:
        """Open the pool on `device` as last committed; IntegrityError if its
        metadata is damaged."""
        store, pages = await MetaStore.open(device)
        geo = store.geometry
        catalog = Catalog(geo.catalog_pages)
        for p in range(geo.catalog_pages):
            catalog.load_page(p, pages[p])
        table = SegmentTable(geo.segment_count, geo.catalog_pages, geo.blocks)
        for i in range(table.pages):
            table.load_page(geo.catalog_pages + i, pages[geo.catalog_pages + i])
        volumes = cls._volumes_from(catalog)
        epochs = {}
        for vs in volumes.values():
            epoch = catalog.records[vs.slot].epoch
            snaps = [s.epoch for s in vs.snapshots.values()]
            if any(s >= epoch for s in snaps):
                raise IntegrityError(f"volume {vs.name} epoch: expected > {max(snaps)}, got {epoch}")
            epochs[vs.id] = (epoch, snaps)
        alloc = SegmentAllocator(table.build_index(epochs))
        pool = cls(PoolCore(device, store, catalog, table, alloc), volumes)
        log.info("opened pool %s: %d volumes, %d of %d segments free",
                 store.superblock.pool_uuid, len(volumes), pool._alloc.available,
                 geo.segment_count)
        return pool

    @staticmethod
    def _volumes_from(catalog: Catalog) -> dict[str, VolumeState]:
        by_id: dict[int, VolumeState] = {}
        for slot, r in catalog.used():
            if r.kind == KIND_VOLUME:
                by_id[r.id] = VolumeState(slot, r.id, r.name, r.size, r.created)
        for slot, r in catalog.used():
            if r.kind == KIND_SNAPSHOT:
                source = by_id.get(r.source)
                if source is None:
                    raise IntegrityError(f"snapshot {r.name} source: expected a volume id, "
                                         f"got {r.source}")
                source.snapshots[r.name] = SnapshotState(slot, r.id, r.name, r.epoch, r.size,
                                                         r.created)
        return {vs.name: vs for vs in by_id.values()}

    async def close(self) -> None:
        """Commit, write the metadata in place, and stop."""
        await self._core.close()

    # -- durability ------------------------------------------------------
    async def commit(self) -> None:
        """Make every write that returned before this call durable, with the
        mapping that points at it (data is flushed before the metadata)."""
        await self._core.commit()

    @property
    def generation(self) -> tuple[uuid.UUID, int]:
        """(pool uuid, last committed metadata transaction): names the
        committed metadata state; equal generations mean equal metadata."""
        return self._core.generation

    async def set_commit_hook(self, hook: CommitHook | None) -> MetadataCommit:
        """Mirror the metadata: from the next commit on, every committed
        journal transaction is awaited through `hook(record)`, in order, after
        it is durable on the device and before the commit returns (so a
        commit is as slow as the hook; the hook must bound its wait and
        should not raise). Returns the whole committed metadata (every page),
        the base the records apply to, with no commit in between."""
        return await self._core.set_commit_hook(hook)

    # -- volumes ---------------------------------------------------------
    @property
    def segment_size(self) -> int:
        return self._geo.segment_size

    def _volume(self, name: str) -> VolumeState:
        vs = self._volumes.get(name)
        if vs is None:
            raise NotFoundError(f"no volume {name!r}")
        return vs

    def _snapshot(self, volume: str, name: str) -> tuple[VolumeState, SnapshotState]:
        vs = self._volume(volume)
        snap = vs.snapshots.get(name)
        if snap is None:
            raise NotFoundError(f"no snapshot {volume}@{name}")
        return vs, snap

    def _record(self, vs: VolumeState) -> CatalogRecord:
        return CatalogRecord(KIND_VOLUME, vs.id, 0, vs.size,
                             self._table.lineages[vs.id].epoch, vs.created, vs.name)

    async def create_volume(self, name: str, size: int) -> VolumeInfo:
        """A new thin volume of `size` bytes (a multiple of 512) reading as zeros."""
        validate_name("name", name)
        _validate_size(size)
        async with self._manage_lock:
            if name in self._volumes:
                raise ValidationError("name", f"volume {name!r} already exists")
            vs = VolumeState(0, self._catalog.next_id(), name, size, time.time())
            self._table.add_volume(vs.id, FIRST_EPOCH)
            try:
                vs.slot = self._catalog.add(self._record(vs))
            except ValidationError:
                self._table.lineages.pop(vs.id)
                raise
            self._volumes[name] = vs
            await self.commit()
        log.info("volume %s created, %d bytes", name, size)
        return self._info(vs)

    def _info(self, vs: VolumeState) -> VolumeInfo:
        return VolumeInfo(vs.name, vs.size, vs.created,
                          len(self._table.lineages[vs.id].live) * self.segment_size,
                          len(vs.snapshots))

    def list_volumes(self) -> list[VolumeInfo]:
        return [self._info(vs) for _, vs in sorted(self._volumes.items())]

    async def delete_volume(self, name: str, *, recursive: bool = False) -> None:
        """Delete a volume; with snapshots only if `recursive` (they go too).
        Its space is free when this returns."""
        async with self._manage_lock:
            vs = self._volume(name)
            if vs.snapshots and not recursive:
                raise ValidationError("name", f"volume {name!r} has snapshots ("
                                      f"{', '.join(sorted(vs.snapshots))}); delete them first")
            await self._delete_volume(vs)
        log.info("volume %s deleted", name)

    async def _delete_volume(self, vs: VolumeState) -> None:
        """No writes in flight (the gate), and no reads of any segment it
        maps (their locks): a read in flight finishes on the old mapping
        before its segments can be reused; one queued for them finds the
        volume deleted (ENODEV)."""
        async with vs.gate.frozen():
            async with vs.locks.hold(self._table.logicals(vs.id)):
                for snap in vs.snapshots.values():
                    snap.deleted = True
                    self._catalog.remove(snap.slot)
                vs.deleted = True
                self._catalog.remove(vs.slot)
                self._alloc.defer(self._table.drop_volume(vs.id))
                del self._volumes[vs.name]
            await self.commit()

    async def resize_volume(self, name: str, size: int) -> VolumeInfo:
        """Grow, or shrink (data beyond the new end is dropped; snapshots keep theirs)."""
        _validate_size(size)
        async with self._manage_lock:
            vs = self._volume(name)
            await self._resize(vs, size)
        log.info("volume %s resized to %d bytes", name, size)
        return self._info(vs)

    async def _resize(self, vs: VolumeState, size: int) -> None:
        """A shrink unmaps the segments beyond the new end under their locks
        and sets the new size there too: a read in flight on them finishes
        on the old mapping; one queued for them gets EINVAL."""
        seg = self.segment_size
        async with vs.gate.frozen():
            if size < vs.size:
                if size % seg and self._table.visible(vs.id, size // seg) is not None:
                    tail = min(vs.size, -(-size // seg) * seg) - size
                    await write_locked(self._core, vs, size, bytes(tail), False)
                end = -(-size // seg)
                async with vs.locks.hold(lg for lg in self._table.lineages[vs.id].live if lg >= end):
                    vs.size = size
                    self._alloc.defer(self._table.truncate(vs.id, end))
            else:
                vs.size = size
            self._catalog.put(vs.slot, self._record(vs))
            await self.commit()

    def open_volume(self, name: str) -> VolumeDevice:
        return VolumeDevice(self._core, self._volume(name))

    # -- snapshots -------------------------------------------------------
    async def create_snapshot(self, volume: str, name: str) -> SnapshotInfo:
        """Freeze the volume's current contents as read-only snapshot `name`.

        Waits for writes in flight; every write that returned before is in
        the snapshot, none that starts after. Durable on return.
        """
        validate_name("name", name)
        async with self._manage_lock:
            vs = self._volume(volume)
            if name in vs.snapshots:
                raise ValidationError("name", f"snapshot {volume}@{name} already exists")
            async with vs.gate.frozen():
                lin = self._table.lineages[vs.id]
                snap = SnapshotState(0, self._catalog.next_id(), name, lin.epoch, vs.size,
                                     time.time())
                snap.slot = self._catalog.add(CatalogRecord(KIND_SNAPSHOT, snap.id, vs.id,
                                                            snap.size, snap.epoch, snap.created,
                                                            name))
                self._table.add_snapshot(vs.id)
                self._catalog.put(vs.slot, self._record(vs))
                vs.snapshots[name] = snap
            await self.commit()
        log.info("snapshot %s@%s created at epoch %d", volume, name, snap.epoch)
        return self._snap_info(vs, snap)

    def _snap_info(self, vs: VolumeState, snap: SnapshotState) -> SnapshotInfo:
        exclusive = self._table.exclusive(vs.id, snap.epoch) * self.segment_size
        return SnapshotInfo(vs.name, snap.name, snap.created, snap.size, exclusive)

    def list_snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        """Snapshots of one volume (or all), oldest first per volume."""
        vols = [self._volume(volume)] if volume is not None else [
            vs for _, vs in sorted(self._volumes.items())]
        return [self._snap_info(vs, s) for vs in vols
                for s in sorted(vs.snapshots.values(), key=lambda s: s.epoch)]

    async def delete_snapshot(self, volume: str, name: str) -> None:
        """Delete a snapshot; the space only it held is free when this returns."""
        async with self._manage_lock:
            vs, snap = self._snapshot(volume, name)
            table = self._table
            # no writes while partial versions that read through to a version
            # this frees get its blocks; readers of those segments finish first
            async with vs.gate.frozen():
                freed, merges = table.plan_drop(vs.id, snap.epoch)
                async with vs.locks.hold(int(table.entries[p]["logical"]) for p in freed):
                    for phys, chain in merges:
                        await self._merge(phys, chain)
                    snap.deleted = True
                    del vs.snapshots[name]
                    self._catalog.remove(snap.slot)
                    self._alloc.defer(table.apply_drop(vs.id, snap.epoch, freed,
                                                       [phys for phys, _ in merges]))
                    # whole in memory only: a FUA write into one must commit first
                    self._core.unsettled.update(phys for phys, _ in merges)
            await self.commit()
        log.info("snapshot %s@%s deleted", volume, name)

    async def _merge(self, phys: int, chain: Chain) -> None:
        """Write into partial version `phys` the blocks it lacks, as `chain`
        resolves them. Only blocks no view reads from `phys` are written, so
        this changes nothing until the mapping says `phys` is whole."""
        sub = self._geo.block_size
        missing = self._table.full & ~self._table.bits(phys)
        b = 0
        while missing >> b:
            if not missing >> b & 1:
                b += 1
                continue
            end = b
            while missing >> end & 1:
                end += 1
            data = await read_chain(self._core, chain, b * sub, end * sub)
            await self._dev.write(self._geo.segment_offset(phys) + b * sub, data)
            b = end

    def open_snapshot(self, volume: str, name: str) -> SnapshotDevice:
        vs, snap = self._snapshot(volume, name)
        return SnapshotDevice(self._core, vs, snap)

    # -- backups ---------------------------------------------------------
    def _ranges(self, logicals: list[int], size: int) -> list[tuple[int, int]]:
        seg = self.segment_size
        out: list[tuple[int, int]] = []
        for logical in logicals:
            start = logical * seg
            if start >= size:
                break
            end = min(size, start + seg)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((start, end - start))
        return out

    def changed_segments(self, volume: str, since: str,
                         until: str | None = None) -> list[tuple[int, int]]:
        """Byte ranges (offset, length), merged and in order, whose content may
        differ between snapshot `since` and snapshot `until` (None: the live
        volume). From the mapping table only; no data is read. A range is
        whole segments, clipped to the newer view's size."""
        vs, old = self._snapshot(volume, since)
        if until is None:
            epoch, size = None, vs.size
        else:
            _, new = self._snapshot(volume, until)
            if new.epoch < old.epoch:
                raise ValidationError("until", f"snapshot {until} is older than {since}")
            epoch, size = new.epoch, new.size
        return self._ranges(self._table.changed(vs.id, old.epoch, epoch), size)

    def allocated_segments(self, volume: str,
                           snapshot: str | None = None) -> list[tuple[int, int]]:
        """Byte ranges that hold data in the volume or one of its snapshots
        (everything else reads as zeros): the map for a first, full backup."""
        if snapshot is None:
            vs = self._volume(volume)
            return self._ranges(self._table.mapped(vs.id, None), vs.size)
        vs, snap = self._snapshot(volume, snapshot)
        return self._ranges(self._table.mapped(vs.id, snap.epoch), snap.size)

    # -- space and fsck --------------------------------------------------
    def space(self) -> PoolSpace:
        seg = self.segment_size
        total = self._geo.segment_count * seg
        free = self._alloc.available * seg
        pending = len(self._alloc.pending) * seg
        return PoolSpace(seg, total, total - free - pending, free, pending,
                         sum(vs.size for vs in self._volumes.values()))

    def check(self) -> CheckReport:
        """fsck: every segment is free exactly once or owned by exactly one
        version some volume or snapshot sees. Run with no I/O in flight."""
        seg = self.segment_size
        sizes = {vs.id: -(-vs.size // seg) for vs in self._volumes.values()}
        problems = self._table.check(sizes)
        owners = self._table.entries["volume"]
        free = self._alloc.free_list() + self._alloc.pending
        on_list = np.zeros(self._geo.segment_count, dtype=np.int64)
        np.add.at(on_list, np.asarray(free, dtype=np.int64), 1)
        for phys in np.flatnonzero(on_list > 1).tolist():
            problems.append(f"segment {phys}: on the free list {on_list[phys]} times")
        for phys in np.flatnonzero((on_list > 0) & (owners != 0)).tolist():
            problems.append(f"segment {phys}: free but owned by volume {int(owners[phys])}")
        for phys in np.flatnonzero((on_list == 0) & (owners == 0)).tolist():
            problems.append(f"segment {phys}: leaked, neither owned nor free")
        owned = int(np.count_nonzero(owners))
        for vs in self._volumes.values():
            lin = self._table.lineages.get(vs.id)
            if lin is None:
                problems.append(f"volume {vs.name}: not in the mapping table")
                continue
            epochs = sorted(s.epoch for s in vs.snapshots.values())
            if epochs != lin.snaps:
                problems.append(f"volume {vs.name}: snapshot epochs {epochs} but table has "
                                f"{lin.snaps}")
        return CheckReport(self._geo.segment_count, len(set(free)), owned, problems)

