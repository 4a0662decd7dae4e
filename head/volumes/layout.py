"""Where things live on a pool's device.

    byte 0        superblock slot 0                       4 KiB
    byte 4096     superblock slot 1                       4 KiB
    byte 8192     metadata pages: catalog, then segment table   (4 KiB each)
    ...           metadata journal                        journal_blocks * 4 KiB
    data_start    data segments, aligned to segment_size  segment_count * segment_size

The journal is big enough for one transaction holding every metadata page, so
any metadata change, however large, commits atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from opie.head.volumes.errors import ValidationError
from opie.head.volumes.records import (CATALOG_PER_PAGE, META_BLOCK, TABLE_PER_PAGE, block_size,
                                  journal_header_blocks)

MIN_SEGMENT = 4096
MIN_JOURNAL_BLOCKS = 256


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Geometry:
    device_size: int
    segment_size: int
    catalog_pages: int
    table_pages: int
    journal_blocks: int
    segment_count: int

    @classmethod
    def plan(cls, device_size: int, segment_size: int, max_entries: int,
             journal_blocks: int | None = None) -> Geometry:
        """Lay out a new pool; ValidationError if the parameters cannot work."""
        if segment_size < MIN_SEGMENT or segment_size & (segment_size - 1):
            raise ValidationError("segment_size",
                                  f"must be a power of two >= {MIN_SEGMENT}, got {segment_size}")
        if max_entries < 1:
            raise ValidationError("max_entries", f"must be >= 1, got {max_entries}")
        catalog_pages = _ceil_div(max_entries, CATALOG_PER_PAGE)
        table_pages = max(1, _ceil_div(device_size // segment_size, TABLE_PER_PAGE))
        pages = catalog_pages + table_pages
        whole_txn = journal_header_blocks(pages) + pages
        if journal_blocks is None:
            # 1 MiB, or a 16th of a small device, but always two whole transactions
            small = device_size // 16 // META_BLOCK
            journal_blocks = max(min(MIN_JOURNAL_BLOCKS, small), 2 * whole_txn)
        if journal_blocks < whole_txn:
            raise ValidationError("journal_blocks",
                                  f"must be >= {whole_txn} to hold every page, got {journal_blocks}")
        geo = cls(device_size, segment_size, catalog_pages, table_pages, journal_blocks, 0)
        count = (device_size - geo.data_start) // segment_size
        if count < 1:
            raise ValidationError("device", f"{device_size} bytes leave no room for a segment")
        return cls(device_size, segment_size, catalog_pages, table_pages, journal_blocks, count)

    @property
    def meta_pages(self) -> int:
        return self.catalog_pages + self.table_pages

    @property
    def max_entries(self) -> int:
        return self.catalog_pages * CATALOG_PER_PAGE

    @property
    def block_size(self) -> int:
        """Bytes per block of a partial version's bitmap."""
        return block_size(self.segment_size)

    @property
    def blocks(self) -> int:
        return self.segment_size // self.block_size

    def page_offset(self, page_no: int) -> int:
        return 2 * META_BLOCK + page_no * META_BLOCK

    @cached_property
    def journal_start(self) -> int:
        return self.page_offset(self.meta_pages)

    @cached_property
    def data_start(self) -> int:
        end = self.journal_start + self.journal_blocks * META_BLOCK
        return _ceil_div(end, self.segment_size) * self.segment_size

    def segment_offset(self, phys: int) -> int:
        return self.data_start + phys * self.segment_size
