"""Per-block checksums kept on each member, in front of its chunks.

Each member keeps one crc32 for each 4 KiB block of its own chunk area (data
and parity alike), so a block that reads back wrong names its member. Entry
value 0 means "not known yet" (a fresh, never written array); a crc32 of 0 is
stored as 1, so the two never mix up.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib
from dataclasses import dataclass

import numpy as np

try:  # ISA-L's CRC-32 is the same function as zlib's, several times faster
    from isal.isal_zlib import crc32 as _block_crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib keeps the format
    from zlib import crc32 as _block_crc32

from .errors import IntegrityError, expect
from .geometry import BLOCK, CSUMS_PER_BLOCK

log = logging.getLogger(__name__)

MAX_CACHED = 8192      # checksum blocks kept in memory per member (32 MiB)
CS_MAGIC = b"O5CS"
CS_VERSION = 1
UNKNOWN = 0

# Checksum block, 4 KiB, at member offset csum_offset + 4096 * index:
#   0  4s    magic b"O5CS"
#   4  H     version (1)
#   6  H     reserved (0)
#   8  I     index (covers data blocks index*1020 .. index*1020+1019)
#  12  I     crc32 of bytes 0..11 and 16..4095
#  16  1020I entry per data block: crc32 of the block (0 = unknown, 0 stored as 1)
_HEAD = struct.Struct("<4sHHI")


def block_tag(block: bytes | memoryview) -> int:
    """The stored checksum of one 4 KiB block."""
    return _block_crc32(block) or 1


def block_tags(data: bytes | memoryview) -> list[int]:
    """Tags of each 4 KiB block of `data` (length a multiple of 4096)."""
    view = memoryview(data)
    crc = _block_crc32
    return [crc(view[i:i + BLOCK]) or 1 for i in range(0, len(view), BLOCK)]


@dataclass(frozen=True)
class ChecksumBlock:
    index: int
    entries: tuple[int, ...]

    def to_bytes(self) -> bytes:
        head = _HEAD.pack(CS_MAGIC, CS_VERSION, 0, self.index)
        body = np.asarray(self.entries, dtype="<u4").tobytes()
        crc = zlib.crc32(body, zlib.crc32(head))
        return head + struct.pack("<I", crc) + body

    @classmethod
    def from_bytes(cls, data: bytes, index: int) -> "ChecksumBlock":
        """Parse; an all-zero block (never written) is all UNKNOWN."""
        expect("checksum block length", BLOCK, len(data))
        if not any(data[:16]):
            if any(data):
                raise IntegrityError("checksum block header: expected magic, got zeros")
            return cls(index, (UNKNOWN,) * CSUMS_PER_BLOCK)
        magic, version, _, got_index = _HEAD.unpack_from(data)
        expect("checksum block magic", CS_MAGIC, magic)
        expect("checksum block version", CS_VERSION, version)
        (crc,) = struct.unpack_from("<I", data, 12)
        expect("checksum block crc32", crc, zlib.crc32(data[16:], zlib.crc32(data[:12])))
        expect("checksum block index", index, got_index)
        entries = np.frombuffer(data, dtype="<u4", offset=16)
        return cls(index, tuple(int(e) for e in entries))


class ChecksumTable:
    """The checksum blocks of one member, cached in memory.

    Contract: `update` changes the cache only; `write_back` makes the changed
    blocks durable (FUA when asked) and is called by the array before a flush
    returns and at once for FUA writes. A checksum block that fails its own
    check is logged and treated as all UNKNOWN; it is rewritten on write back.
    """

    def __init__(self, name: str, csum_offset: int, read, write) -> None:
        self.name = name
        self.csum_offset = csum_offset
        self._read = read        # async (offset, length) -> bytes
        self._write = write      # async (offset, data, fua) -> None
        self._blocks: dict[int, np.ndarray] = {}
        self._dirty: set[int] = set()
        self._writing: dict[int, bool] = {}    # block -> fua, while its write back is in flight
        self._locks: dict[int, "asyncio.Lock"] = {}
        self.bad_blocks = 0

    def _lock(self, index: int) -> asyncio.Lock:
        lock = self._locks.get(index)
        if lock is None:
            lock = self._locks[index] = asyncio.Lock()
        return lock

    async def _load(self, index: int) -> np.ndarray:
        """The cached entries of block `index`, read from the member if not cached.

        The read holds the block's lock, which a write back of that block
        holds until its write has landed: a block evicted while its write back
        is in flight is read again only once the member has the new contents."""
        entries = self._blocks.get(index)
        if entries is not None:
            return entries
        async with self._lock(index):
            entries = self._blocks.get(index)
            if entries is not None:
                return entries
            return await self._fetch(index)

    async def _fetch(self, index: int) -> np.ndarray:
        """Read block `index` from the member into the cache; the caller holds its lock."""
        raw = await self._read(self.csum_offset + index * BLOCK, BLOCK)
        entries = self._blocks.get(index)
        if entries is not None:
            return entries
        try:
            entries = np.array(ChecksumBlock.from_bytes(raw, index).entries, dtype=np.uint32)
        except IntegrityError as exc:
            log.warning("%s: checksum block %d unreadable, treating as unknown: %s",
                        self.name, index, exc)
            self.bad_blocks += 1
            entries = np.zeros(CSUMS_PER_BLOCK, dtype=np.uint32)
            self._dirty.add(index)
        self._blocks[index] = entries
        self._evict(keep=index)
        return entries

    def _evict(self, keep: int | None = None) -> None:
        """Keep at most MAX_CACHED blocks: drop the oldest clean ones, never
        `keep` (the block just loaded, which its caller is about to use)."""
        if len(self._blocks) <= MAX_CACHED:
            return
        clean = [i for i in self._blocks if i not in self._dirty and i != keep]
        for index in clean[:len(self._blocks) - MAX_CACHED]:
            del self._blocks[index]

    async def get(self, first: int, count: int) -> list[int]:
        """Stored tags of member blocks first..first+count-1 (0 = unknown)."""
        out: list[int] = []
        block = first
        while block < first + count:
            index, entry = divmod(block, CSUMS_PER_BLOCK)
            n = min(CSUMS_PER_BLOCK - entry, first + count - block)
            entries = await self._load(index)
            out.extend(int(x) for x in entries[entry:entry + n])
            block += n
        return out

    async def update(self, first: int, tags: list[int]) -> set[int]:
        """Set tags of blocks first..; returns the checksum block indexes changed.
        Each block is marked dirty as soon as it changes, so loading the next
        one (which may evict clean blocks) cannot drop it."""
        changed: set[int] = set()
        block, pos = first, 0
        while pos < len(tags):
            index, entry = divmod(block, CSUMS_PER_BLOCK)
            n = min(CSUMS_PER_BLOCK - entry, len(tags) - pos)
            entries = await self._load(index)
            entries[entry:entry + n] = tags[pos:pos + n]
            self._dirty.add(index)
            changed.add(index)
            block += n
            pos += n
        return changed

    async def write_back(self, indexes: set[int] | None = None, fua: bool = False) -> None:
        """Write the dirty checksum blocks (or those of `indexes` that are dirty).

        On return every change made before the call has landed, FUA when asked:
        a block another write back is writing is waited for (and written again
        with FUA if that write was not). A block is clean while its write is in
        flight (it may be evicted); if the write fails or is cancelled, the
        block is cached and dirty again."""
        inflight = dict(self._writing)
        pending = self._dirty | inflight.keys()
        todo = sorted(pending if indexes is None else pending & indexes)
        for index in todo:
            async with self._lock(index):
                if index in self._dirty:
                    entries = self._blocks[index]
                elif fua and inflight.get(index) is False:
                    entries = self._blocks.get(index)
                    if entries is None:
                        entries = await self._fetch(index)
                else:
                    continue
                self._dirty.discard(index)
                record = ChecksumBlock(index, tuple(int(x) for x in entries))
                self._writing[index] = fua
                try:
                    await self._write(self.csum_offset + index * BLOCK, record.to_bytes(), fua)
                except BaseException:
                    # loads wait for the lock we hold: evicted at most, never reloaded
                    self._blocks.setdefault(index, entries)
                    self._dirty.add(index)
                    raise
                finally:
                    del self._writing[index]
        self._evict()
