"""Crash-consistent metadata: an array of 4 KiB pages changed atomically
through a redo journal, with two superblock slots.

A commit writes one journal transaction holding the new image of every page
it changes (`records.JournalHeader`), with FUA. The transaction is the commit
point: on open, transactions are replayed in sequence order from the
superblock's `journal_seq` until the first one that is missing, torn, out of
sequence or from another pool. Pages are written in place only at a
checkpoint, when the journal is full or at close: in-place writes, flush,
then a superblock with generation+1 and the next `journal_seq` into the other
slot, with FUA. A crash at any point leaves the last committed state: a torn
page is repaired by replay, a torn superblock is ignored in favour of the
other slot.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid as uuidlib

from opie.head.volumes.devices import BlockDevice
from opie.head.volumes.errors import IntegrityError, UnsupportedVersion
from opie.head.volumes.layout import Geometry
from opie.head.volumes.records import (META_BLOCK, TABLE_PER_PAGE, JournalHeader, Superblock,
                                  journal_header_blocks)

log = logging.getLogger(__name__)


class MetaStore:
    """Owns the superblocks, the in-place pages and the journal of one pool.

    Callers serialize `commit`, `checkpoint` and `close` (the pool holds its
    commit lock around them).
    """

    def __init__(self, device: BlockDevice, geometry: Geometry, superblock: Superblock,
                 head: int, seq: int, unplaced: dict[int, bytes]) -> None:
        self._dev = device
        self.geometry = geometry
        self.superblock = superblock
        self._head = head          # next free journal block
        self._seq = seq            # sequence number of the next transaction
        self._unplaced = unplaced  # committed page images not yet written in place

    @classmethod
    async def create(cls, device: BlockDevice, geometry: Geometry,
                     pages: list[bytes]) -> MetaStore:
        """Format: write every page in place, flush, then both superblock slots."""
        await device.write(geometry.page_offset(0), b"".join(pages))
        await device.flush()
        sb = Superblock(slot=0, generation=1, pool_uuid=uuidlib.uuid4(),
                        device_size=geometry.device_size, segment_size=geometry.segment_size,
                        catalog_pages=geometry.catalog_pages, table_pages=geometry.table_pages,
                        journal_blocks=geometry.journal_blocks,
                        segment_count=geometry.segment_count, journal_seq=1)
        older = dataclasses.replace(sb, slot=1, generation=0)
        await device.write(0, sb.to_bytes() + older.to_bytes(), fua=True)
        log.info("formatted pool %s: %d segments of %d bytes", sb.pool_uuid,
                 geometry.segment_count, geometry.segment_size)
        return cls(device, geometry, sb, 0, 1, {})

    @classmethod
    async def open(cls, device: BlockDevice) -> tuple[MetaStore, list[bytes]]:
        """Load the newest valid superblock, the pages, and replay the journal.

        Returns the store and every page as committed last (frames unchecked).
        """
        both = await device.read(0, 2 * META_BLOCK)
        found: list[Superblock] = []
        errors: list[str] = []
        for slot in (0, 1):
            try:
                sb = Superblock.from_bytes(both[slot * META_BLOCK:(slot + 1) * META_BLOCK])
            except UnsupportedVersion:
                raise   # a sound superblock of another format: say so, not "damaged"
            except IntegrityError as exc:
                errors.append(f"slot {slot}: {exc}")
                continue
            if sb.slot != slot:
                errors.append(f"slot {slot}: expected slot {slot}, got {sb.slot}")
                continue
            found.append(sb)
        if not found:
            raise IntegrityError("no valid superblock: " + "; ".join(errors))
        sb = max(found, key=lambda s: s.generation)
        if sb.device_size > device.size:
            raise IntegrityError(f"device size: expected >= {sb.device_size}, got {device.size}")
        geo = Geometry(sb.device_size, sb.segment_size, sb.catalog_pages, sb.table_pages,
                       sb.journal_blocks, sb.segment_count)
        cls._check_geometry(geo)
        pages = await cls._read_pages(device, geo)
        unplaced: dict[int, bytes] = {}
        head, seq = 0, await cls._first_seq(device, geo, sb)
        while head < geo.journal_blocks:
            txn = await cls._read_txn(device, geo, sb, head, seq)
            if txn is None:
                break
            header, images = txn
            for i, page_no in enumerate(header.pages):
                if page_no >= geo.meta_pages:
                    raise IntegrityError(f"journal seq {seq} page: expected < {geo.meta_pages}, "
                                         f"got {page_no}")
                image = images[i * META_BLOCK:(i + 1) * META_BLOCK]
                pages[page_no] = image
                unplaced[page_no] = image
            head += header.nblocks
            seq += 1
        if seq != sb.journal_seq:
            log.info("pool %s: replayed journal transactions %d..%d", sb.pool_uuid,
                     sb.journal_seq, seq - 1)
        return cls(device, geo, sb, head, seq, unplaced), pages

    @classmethod
    async def _first_seq(cls, device: BlockDevice, geo: Geometry, sb: Superblock) -> int:
        """Where replay starts: the superblock's journal_seq, unless the journal
        already starts with a later, whole transaction. That happens only if a
        newer superblock was written (checkpoints write it before reusing the
        journal) and has since been damaged; its pages are in place, so
        replaying from there loses nothing."""
        _magic, got_seq, got_uuid, _n, _b = JournalHeader.peek(
            await device.read(geo.journal_start, META_BLOCK))
        if got_uuid != sb.pool_uuid or got_seq <= sb.journal_seq:
            return sb.journal_seq
        if await cls._read_txn(device, geo, sb, 0, got_seq) is None:
            return sb.journal_seq
        log.warning("pool %s: superblock generation %d is not the newest (the journal "
                    "starts at transaction %d); replaying from there", sb.pool_uuid,
                    sb.generation, got_seq)
        return got_seq

    @staticmethod
    async def _read_pages(device: BlockDevice, geo: Geometry) -> list[bytes]:
        """The in-place metadata pages, unchecked."""
        raw = await device.read(geo.page_offset(0), geo.meta_pages * META_BLOCK)
        return [raw[i * META_BLOCK:(i + 1) * META_BLOCK] for i in range(geo.meta_pages)]

    @staticmethod
    def _check_geometry(geo: Geometry) -> None:
        """A superblock with a good CRC can still describe an impossible layout."""
        if geo.segment_size < META_BLOCK or geo.segment_size & (geo.segment_size - 1):
            raise IntegrityError(f"superblock segment_size: expected a power of two "
                                 f">= {META_BLOCK}, got {geo.segment_size}")
        if geo.table_pages * TABLE_PER_PAGE < geo.segment_count:
            raise IntegrityError(f"superblock table_pages: expected >= "
                                 f"{-(-geo.segment_count // TABLE_PER_PAGE)}, got {geo.table_pages}")
        end = geo.segment_offset(geo.segment_count)
        if end > geo.device_size:
            raise IntegrityError(f"superblock layout end: expected <= {geo.device_size}, got {end}")

    @staticmethod
    async def _read_txn(device: BlockDevice, geo: Geometry, sb: Superblock, head: int,
                        seq: int) -> tuple[JournalHeader, bytes] | None:
        """The transaction `seq` at block `head`, or None if it is not (all) there."""
        at = geo.journal_start + head * META_BLOCK
        magic, got_seq, got_uuid, _npages, nblocks = JournalHeader.peek(
            await device.read(at, META_BLOCK))
        if (magic != b"OPVJ" or got_seq != seq or got_uuid != sb.pool_uuid
                or nblocks < 1 or head + nblocks > geo.journal_blocks):
            return None
        try:
            header, images = JournalHeader.from_bytes(await device.read(at, nblocks * META_BLOCK))
        except IntegrityError as exc:
            log.warning("pool %s: journal transaction %d is torn (%s); it did not commit",
                        sb.pool_uuid, seq, exc)
            return None
        return header, images

    async def commit(self, images: dict[int, bytes]) -> None:
        """Make `images` (page number -> framed page) the committed state, atomically.

        Every device write that returned before this call is durable before
        the transaction is written; on return the new pages are durable.
        """
        await self._dev.flush()
        pages = sorted(images)
        need = journal_header_blocks(len(pages)) + len(pages)
        if self._head + need > self.geometry.journal_blocks:
            await self.checkpoint()
        header = JournalHeader(self._seq, self.superblock.pool_uuid, tuple(pages))
        txn = header.to_bytes(b"".join(images[p] for p in pages))
        await self._dev.write(self.geometry.journal_start + self._head * META_BLOCK, txn, fua=True)
        self._head += need
        self._seq += 1
        self._unplaced.update(images)

    @property
    def committed_seq(self) -> int:
        """Sequence number of the last committed transaction (0 for a pool
        that has none yet). It only grows, across checkpoints and reopens:
        with the pool uuid it names the committed metadata state."""
        return self._seq - 1

    async def committed_pages(self) -> list[bytes]:
        """Every metadata page as last committed: the in-place pages read from
        the device, overlaid by the images only in the journal. Callers hold
        the pool's commit lock (no commit or checkpoint in between)."""
        pages = await self._read_pages(self._dev, self.geometry)
        for page_no, image in self._unplaced.items():
            pages[page_no] = image
        return pages

    async def checkpoint(self) -> None:
        """Write committed pages in place and restart the journal (see module doc)."""
        if self._unplaced:
            run: list[int] = []
            for page_no in sorted(self._unplaced):
                if run and page_no != run[-1] + 1:
                    await self._write_run(run)
                    run = []
                run.append(page_no)
            await self._write_run(run)
            await self._dev.flush()
        old = self.superblock
        sb = dataclasses.replace(old, slot=(old.slot + 1) % 2, generation=old.generation + 1,
                                 journal_seq=self._seq)
        await self._dev.write(sb.slot * META_BLOCK, sb.to_bytes(), fua=True)
        self.superblock = sb
        self._head = 0
        self._unplaced.clear()
        log.debug("pool %s: checkpoint, generation %d", sb.pool_uuid, sb.generation)

    async def _write_run(self, run: list[int]) -> None:
        data = b"".join(self._unplaced[p] for p in run)
        await self._dev.write(self.geometry.page_offset(run[0]), data)

    async def close(self) -> None:
        """Checkpoint if anything is only in the journal."""
        if self._unplaced:
            await self.checkpoint()
