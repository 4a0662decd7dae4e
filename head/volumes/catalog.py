"""The catalog: the pool's volumes and snapshots as fixed-size records in
metadata pages 0..catalog_pages-1 (`records.CatalogRecord`). Names are
validated here. In memory only; the pool commits dirty pages.
"""

from __future__ import annotations

import re

from opie.head.volumes.errors import IntegrityError, ValidationError
from opie.head.volumes.records import (CATALOG_PER_PAGE, CATALOG_RECORD, KIND_CATALOG, KIND_EMPTY,
                                  CatalogRecord, page_from_bytes, page_to_bytes)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
EMPTY = CatalogRecord(KIND_EMPTY, 0, 0, 0, 0, 0.0, "")


def validate_name(field: str, name: object) -> str:
    """The name if it is 1-64 of [A-Za-z0-9._-], not starting with . _ or -."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValidationError(field, f"expected 1-64 characters of A-Z a-z 0-9 . _ - "
                                     f"starting with a letter or digit, got {name!r}")
    return name


class Catalog:
    def __init__(self, pages: int) -> None:
        self.records: list[CatalogRecord] = [EMPTY] * (pages * CATALOG_PER_PAGE)
        self.dirty_pages: set[int] = set()

    def load_page(self, page_no: int, page: bytes) -> None:
        payload = page_from_bytes(KIND_CATALOG, page_no, page)
        for i in range(CATALOG_PER_PAGE):
            rec = CatalogRecord.from_bytes(payload[i * CATALOG_RECORD:(i + 1) * CATALOG_RECORD])
            if rec.kind != KIND_EMPTY and rec.id < 1:
                raise IntegrityError(f"catalog page {page_no} record {i} id: expected >= 1, "
                                     f"got {rec.id}")
            self.records[page_no * CATALOG_PER_PAGE + i] = rec

    def page_image(self, page_no: int) -> bytes:
        recs = self.records[page_no * CATALOG_PER_PAGE:(page_no + 1) * CATALOG_PER_PAGE]
        return page_to_bytes(KIND_CATALOG, page_no, b"".join(r.to_bytes() for r in recs))

    def used(self) -> list[tuple[int, CatalogRecord]]:
        return [(slot, r) for slot, r in enumerate(self.records) if r.kind != KIND_EMPTY]

    def put(self, slot: int, record: CatalogRecord) -> None:
        self.records[slot] = record
        self.dirty_pages.add(slot // CATALOG_PER_PAGE)

    def add(self, record: CatalogRecord) -> int:
        """Store `record` in a free slot; ValidationError if the catalog is full."""
        for slot, r in enumerate(self.records):
            if r.kind == KIND_EMPTY:
                self.put(slot, record)
                return slot
        raise ValidationError("catalog", f"full: {len(self.records)} volumes and snapshots")

    def remove(self, slot: int) -> None:
        self.put(slot, EMPTY)

    def next_id(self) -> int:
        return max((r.id for r in self.records), default=0) + 1
