"""What a pool shares with the volume and snapshot devices it opens.

The data path (`volume`) needs the device, the geometry, the mapping table,
the free segments, the segments whose mapping is not yet durable, and the
commit that makes data and mapping durable. Management (`pool`) needs the
same plus the catalog and the volumes. Both are given one `PoolCore`, so
neither reaches into the other's fields. Loop-only.

The commit hook (`on_commit`) is how the passive head's copy of the metadata
is kept: every committed journal transaction is handed to it as a
`MetadataCommit`, in sequence order, after it is durable on the device and
before the commit returns.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from opie.head.volumes.allocator import SegmentAllocator
from opie.head.volumes.catalog import Catalog
from opie.head.volumes.devices import BlockDevice
from opie.head.volumes.layout import Geometry
from opie.head.volumes.mapping import SegmentTable
from opie.head.volumes.metastore import MetaStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetadataCommit:
    """Committed metadata pages of pool `pool_uuid` as of transaction `seq`:
    one transaction's pages (page number -> framed 4 KiB image), or every
    page (a base to apply later transactions to). `seq` only grows."""

    pool_uuid: uuid.UUID
    seq: int
    pages: Mapping[int, bytes]


CommitHook = Callable[[MetadataCommit], Awaitable[None]]


class PoolCore:
    """The device and the metadata of one open pool, and their durability."""

    def __init__(self, device: BlockDevice, store: MetaStore, catalog: Catalog,
                 table: SegmentTable, alloc: SegmentAllocator) -> None:
        self.device = device
        self.store = store
        self.geometry: Geometry = store.geometry
        self.catalog = catalog
        self.table = table
        self.alloc = alloc
        # segments whose mapping is not yet durable (new, filled or merged): a FUA
        # write into one commits before it returns
        self.unsettled: set[int] = set()
        self._commit_lock = asyncio.Lock()
        self._on_commit: CommitHook | None = None

    @property
    def segment_size(self) -> int:
        return self.geometry.segment_size

    async def commit(self) -> None:
        """Make every write that returned before this call durable, with the
        mapping that points at it (data is flushed before the metadata).
        Segments freed before the call become reusable when it returns.
        With a commit hook, a commit that wrote a transaction returns only
        after the hook has returned for it (the hook bounds its own wait)."""
        async with self._commit_lock:
            table, catalog = self.table, self.catalog
            images = {p: table.page_image(p) for p in table.dirty_pages}
            images.update({p: catalog.page_image(p) for p in catalog.dirty_pages})
            table.dirty_pages.clear()
            catalog.dirty_pages.clear()
            frees = self.alloc.detach_pending()
            settled = set(self.unsettled)
            if not images:
                self.alloc.give_back(frees)
                await self.device.flush()
                return
            try:
                await self.store.commit(images)
            except BaseException:
                first_table_page = self.geometry.catalog_pages
                table.dirty_pages.update(p for p in images if p >= first_table_page)
                catalog.dirty_pages.update(p for p in images if p < first_table_page)
                self.alloc.defer(frees)
                raise
            self.alloc.give_back(frees)
            self.unsettled -= settled
            if self._on_commit is not None:
                await self._on_commit(MetadataCommit(self.store.superblock.pool_uuid,
                                                     self.store.committed_seq, images))

    @property
    def generation(self) -> tuple[uuid.UUID, int]:
        """(pool uuid, sequence number of the last committed transaction)."""
        return self.store.superblock.pool_uuid, self.store.committed_seq

    async def set_commit_hook(self, hook: CommitHook | None) -> MetadataCommit:
        """From the next commit on, await `hook(record)` for every committed
        transaction (None: no hook). Returns every page as committed now: the
        base those records apply to, with no commit in between."""
        async with self._commit_lock:
            self._on_commit = hook
            pages = await self.store.committed_pages()
            return MetadataCommit(self.store.superblock.pool_uuid, self.store.committed_seq,
                                  dict(enumerate(pages)))

    async def reserve(self, n: int) -> list[int]:
        """`n` free segments; commits first if freed ones are pending.
        OSError(ENOSPC), with nothing taken, if there are not enough."""
        if n > self.alloc.available and self.alloc.pending:
            await self.commit()
        if n > self.alloc.available:
            log.warning("pool full: a write needs %d segments, %d free", n, self.alloc.available)
        return self.alloc.take(n)

    async def close(self) -> None:
        """Commit, write the metadata in place, and stop."""
        await self.commit()
        async with self._commit_lock:
            await self.store.close()
