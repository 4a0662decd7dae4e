"""On-disk records of a volume pool: superblock, metadata pages, catalog
records, segment-table entries and journal transaction headers.

Every record starts with a magic and a version and carries a CRC32; the byte
layout is written above the `struct` that reads it. All integers are
little-endian. Checks raise `IntegrityError("expected X, got Y")`.

The pool's metadata is a flat array of 4 KiB *metadata pages* (catalog pages
first, then segment-table pages); see `layout.py` for where they live.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass

import numpy as np

from opie.head.volumes.errors import IntegrityError, UnsupportedVersion

META_BLOCK = 4096
# 2: segment-table entries grew to 64 bytes with a validity bitmap
# (sub-segment copy-on-write). A version-1 pool is refused on open.
VERSION = 2


def _check(what: str, expected: object, got: object) -> None:
    if expected != got:
        raise IntegrityError(f"{what}: expected {expected!r}, got {got!r}")


# Superblock, one per slot (slot 0 at byte 0, slot 1 at byte 4096), zero
# padded to 4096 bytes:
#   off size field
#     0    8 magic            b"OPIEPOOL"
#     8    2 version          2
#    10    2 slot             0 or 1 (where this copy lives)
#    12    4 meta_block       4096
#    16    8 generation       +1 per checkpoint; the valid slot with the
#                             highest generation wins
#    24   16 pool uuid        also stamped in every journal transaction
#    40    8 device_size      bytes of the device at format time
#    48    4 segment_size     bytes per data segment (power of two)
#    52    4 catalog_pages    metadata pages holding catalog records
#    56    4 table_pages      metadata pages holding segment entries
#    60    4 journal_blocks   4 KiB blocks of the metadata journal
#    64    8 segment_count    data segments in the pool
#    72    8 journal_seq      sequence number of the first transaction to replay
#    80    4 crc32            of bytes 0..80
_SUPER = struct.Struct("<8sHHIQ16sQIIIIQQ")
_SUPER_MAGIC = b"OPIEPOOL"


@dataclass(frozen=True)
class Superblock:
    slot: int
    generation: int
    pool_uuid: uuidlib.UUID
    device_size: int
    segment_size: int
    catalog_pages: int
    table_pages: int
    journal_blocks: int
    segment_count: int
    journal_seq: int

    def to_bytes(self) -> bytes:
        body = _SUPER.pack(_SUPER_MAGIC, VERSION, self.slot, META_BLOCK, self.generation,
                           self.pool_uuid.bytes, self.device_size, self.segment_size,
                           self.catalog_pages, self.table_pages, self.journal_blocks,
                           self.segment_count, self.journal_seq)
        body += struct.pack("<I", zlib.crc32(body))
        return body.ljust(META_BLOCK, b"\0")

    @classmethod
    def from_bytes(cls, data: bytes) -> Superblock:
        _check("superblock length", META_BLOCK, len(data))
        (magic, version, slot, meta_block, generation, raw_uuid, device_size, segment_size,
         catalog_pages, table_pages, journal_blocks, segment_count,
         journal_seq) = _SUPER.unpack_from(data)
        _check("superblock magic", _SUPER_MAGIC, magic)
        (crc,) = struct.unpack_from("<I", data, _SUPER.size)
        _check("superblock crc32", zlib.crc32(data[:_SUPER.size]), crc)
        if version != VERSION:
            raise UnsupportedVersion(VERSION, version)
        _check("superblock meta_block", META_BLOCK, meta_block)
        return cls(slot, generation, uuidlib.UUID(bytes=raw_uuid), device_size, segment_size,
                   catalog_pages, table_pages, journal_blocks, segment_count, journal_seq)


# Metadata page (4096 bytes) = 32-byte header + payload of 4064 bytes:
#   off size field
#     0    4 magic     b"OPVM"
#     4    2 version   2
#     6    2 kind      1 catalog page, 2 segment-table page
#     8    4 page_no   index in the metadata page array
#    12    4 crc32     of the whole page with this field zeroed
#    16   16 reserved  zero
_PAGE = struct.Struct("<4sHHII16x")
_PAGE_MAGIC = b"OPVM"
PAGE_PAYLOAD = META_BLOCK - _PAGE.size
KIND_CATALOG = 1
KIND_TABLE = 2


def page_to_bytes(kind: int, page_no: int, payload: bytes) -> bytes:
    """Frame `payload` (at most PAGE_PAYLOAD bytes) as a checksummed page."""
    body = bytearray(META_BLOCK)
    _PAGE.pack_into(body, 0, _PAGE_MAGIC, VERSION, kind, page_no, 0)
    body[_PAGE.size:_PAGE.size + len(payload)] = payload
    struct.pack_into("<I", body, 12, zlib.crc32(body))
    return bytes(body)


def page_from_bytes(kind: int, page_no: int, data: bytes) -> bytes:
    """Check a metadata page's frame and return its payload."""
    _check(f"metadata page {page_no} length", META_BLOCK, len(data))
    magic, version, got_kind, got_no, crc = _PAGE.unpack_from(data)
    _check(f"metadata page {page_no} magic", _PAGE_MAGIC, magic)
    zeroed = bytearray(data)
    struct.pack_into("<I", zeroed, 12, 0)
    _check(f"metadata page {page_no} crc32", zlib.crc32(zeroed), crc)
    _check(f"metadata page {page_no} version", VERSION, version)
    _check(f"metadata page {page_no} kind", kind, got_kind)
    _check(f"metadata page {page_no} page_no", page_no, got_no)
    return data[_PAGE.size:]


# Catalog record (128 bytes), CATALOG_PER_PAGE of them per catalog page; the
# record's position (page, index) is its slot:
#   off size field
#     0    1 kind      0 empty, 1 volume, 2 snapshot
#     1    3 reserved
#     4    4 id        volume id (volume) or snapshot id (snapshot), >= 1
#     8    4 source    snapshot: id of the volume it was taken of; volume: 0
#    12    8 size      bytes (snapshot: size of the source when taken)
#    20    8 epoch     volume: current write epoch; snapshot: epoch it froze
#    28    8 created   unix time, float64
#    36   64 name      utf-8, NUL padded
#   100   28 reserved
_CATALOG = struct.Struct("<B3xIIQQd64s28x")
CATALOG_RECORD = _CATALOG.size
CATALOG_PER_PAGE = PAGE_PAYLOAD // CATALOG_RECORD
KIND_EMPTY = 0
KIND_VOLUME = 1
KIND_SNAPSHOT = 2


@dataclass(frozen=True)
class CatalogRecord:
    kind: int
    id: int
    source: int
    size: int
    epoch: int
    created: float
    name: str

    def to_bytes(self) -> bytes:
        return _CATALOG.pack(self.kind, self.id, self.source, self.size, self.epoch,
                             self.created, self.name.encode())

    @classmethod
    def from_bytes(cls, data: bytes) -> CatalogRecord:
        _check("catalog record length", CATALOG_RECORD, len(data))
        kind, id_, source, size, epoch, created, raw = _CATALOG.unpack_from(data)
        if kind not in (KIND_EMPTY, KIND_VOLUME, KIND_SNAPSHOT):
            raise IntegrityError(f"catalog record kind: expected 0, 1 or 2, got {kind}")
        try:
            name = raw.rstrip(b"\0").decode()
        except UnicodeDecodeError as exc:
            raise IntegrityError(f"catalog record name: expected utf-8, got {raw!r}") from exc
        return cls(kind, id_, source, size, epoch, created, name)


# Segment-table entry (64 bytes), one per physical data segment, in segment
# order, TABLE_PER_PAGE per table page. It says which version of which
# volume segment the physical segment holds:
#   off size field
#     0    4 volume    owning volume id; 0 = free
#     4    4 flags     FLAG_PARTIAL, FLAG_BACKED; other bits 0
#     8    8 logical   segment index inside the volume
#    16    8 birth     volume epoch of the write that placed this version
#    24    8 death     epoch it was superseded at; 2**64-1 while live
#    32   32 bitmap    4 x u64, bit b of word b // 64: block b (segment_size /
#                      blocks_per_segment bytes) holds this version's data;
#                      only with FLAG_PARTIAL (without it every block does)
# A snapshot frozen at epoch E sees the version with birth <= E < death. The
# blocks a partial version does not hold read as the previous version of the
# same volume segment (the one whose death is this one's birth) if
# FLAG_BACKED, else as zeros.
ENTRY_DTYPE = np.dtype([("volume", "<u4"), ("flags", "<u4"), ("logical", "<u8"),
                        ("birth", "<u8"), ("death", "<u8"), ("bitmap", "<u8", (4,))])
TABLE_PER_PAGE = PAGE_PAYLOAD // ENTRY_DTYPE.itemsize
FLAG_PARTIAL = 1
FLAG_BACKED = 2
BITMAP_BITS = 256
MIN_BLOCK = 512


def block_size(segment_size: int) -> int:
    """Bytes per bitmap block: a sector, or more for segments over 128 KiB."""
    return max(MIN_BLOCK, segment_size // BITMAP_BITS)


LIVE = 2**64 - 1


# Journal transaction: header block(s) followed by the page images.
#   off size field
#     0    4 magic     b"OPVJ"
#     4    2 version   2
#     6    2 reserved
#     8    8 seq       transaction sequence number (consecutive)
#    16   16 pool uuid
#    32    4 npages    page images in the transaction
#    36    4 nblocks   header blocks + npages
#    40    4 crc32     of header (this field zeroed), page list and images
#    44    4 reserved
#    48 4*n  page numbers (u32), then zero padding to a 4096 boundary
_JOURNAL = struct.Struct("<4sHxxQ16sIII4x")
_JOURNAL_MAGIC = b"OPVJ"


def journal_header_blocks(npages: int) -> int:
    return -(-(_JOURNAL.size + 4 * npages) // META_BLOCK)


@dataclass(frozen=True)
class JournalHeader:
    seq: int
    pool_uuid: uuidlib.UUID
    pages: tuple[int, ...]

    @property
    def nblocks(self) -> int:
        return journal_header_blocks(len(self.pages)) + len(self.pages)

    def to_bytes(self, images: bytes) -> bytes:
        """The whole transaction: header blocks with the CRC, then `images`."""
        size = journal_header_blocks(len(self.pages)) * META_BLOCK
        head = bytearray(size)
        _JOURNAL.pack_into(head, 0, _JOURNAL_MAGIC, VERSION, self.seq, self.pool_uuid.bytes,
                           len(self.pages), self.nblocks, 0)
        struct.pack_into(f"<{len(self.pages)}I", head, _JOURNAL.size, *self.pages)
        crc = zlib.crc32(images, zlib.crc32(head))
        struct.pack_into("<I", head, 40, crc)
        return bytes(head) + images

    @staticmethod
    def peek(block: bytes) -> tuple[bytes, int, uuidlib.UUID, int, int]:
        """(magic, seq, uuid, npages, nblocks) of a first header block, unchecked."""
        magic, _version, seq, raw_uuid, npages, nblocks, _crc = _JOURNAL.unpack_from(block)
        return magic, seq, uuidlib.UUID(bytes=raw_uuid), npages, nblocks

    @classmethod
    def from_bytes(cls, txn: bytes) -> tuple[JournalHeader, bytes]:
        """Check a whole transaction; return its header and its page images."""
        if len(txn) < META_BLOCK:
            raise IntegrityError(f"journal length: expected >= {META_BLOCK}, got {len(txn)}")
        magic, version, seq, raw_uuid, npages, nblocks, crc = _JOURNAL.unpack_from(txn)
        _check("journal magic", _JOURNAL_MAGIC, magic)
        _check("journal version", VERSION, version)
        hblocks = journal_header_blocks(npages)
        _check("journal nblocks", hblocks + npages, nblocks)
        _check("journal length", nblocks * META_BLOCK, len(txn))
        head = bytearray(txn[:hblocks * META_BLOCK])
        struct.pack_into("<I", head, 40, 0)
        images = txn[hblocks * META_BLOCK:]
        _check("journal crc32", zlib.crc32(images, zlib.crc32(head)), crc)
        pages = struct.unpack_from(f"<{npages}I", txn, _JOURNAL.size)
        return cls(seq, uuidlib.UUID(bytes=raw_uuid), tuple(pages)), images
