"""The write-intent bitmap: one bit per region of stripes that may be inconsistent.

Contract: a region's bit is durable on every live member (FUA) before any
write to that region is issued. Bits are cleared only after a flush that
covered every write to the region, and never while a member is missing, so
the bitmap is also the list of regions a missing member missed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .errors import expect
from .geometry import BLOCK

BM_MAGIC = b"O5BM"
BM_VERSION = 1

# Bitmap record, member offset 4096, one 4 KiB block, little-endian:
#   0  4s    magic b"O5BM"
#   4  H     version (1)
#   6  H     reserved (0)
#   8  Q     events of the superblock it was written with
#  16  Q     retired seq: log records with seq <= this are obsolete (flushed)
#  24  I     region stripes (stripes per bit)
#  28  I     bits in use
#  32  4060s bits, bit r of byte r//8 (LSB first) set = region r dirty
# 4092 I     crc32 of bytes 0..4091
_HEAD = struct.Struct("<4sHHQQII")
BITS_BYTES = BLOCK - _HEAD.size - 4
MAX_REGIONS = BITS_BYTES * 8


@dataclass(frozen=True)
class BitmapRecord:
    events: int
    retired_seq: int
    region_stripes: int
    nbits: int
    bits: bytes

    def dirty_regions(self) -> list[int]:
        return [r for r in range(self.nbits) if self.bits[r // 8] >> (r % 8) & 1]

    @classmethod
    def from_regions(cls, events: int, retired_seq: int, region_stripes: int, nbits: int,
                     regions: set[int]) -> "BitmapRecord":
        bits = bytearray(BITS_BYTES)
        for r in regions:
            bits[r // 8] |= 1 << (r % 8)
        return cls(events, retired_seq, region_stripes, nbits, bytes(bits))

    def to_bytes(self) -> bytes:
        body = _HEAD.pack(BM_MAGIC, BM_VERSION, 0, self.events, self.retired_seq,
                          self.region_stripes, self.nbits) + self.bits.ljust(BITS_BYTES, b"\0")
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> "BitmapRecord":
        expect("bitmap length", BLOCK, len(data))
        magic, version, _, events, retired, region, nbits = _HEAD.unpack_from(data)
        expect("bitmap magic", BM_MAGIC, magic)
        expect("bitmap version", BM_VERSION, version)
        (crc,) = struct.unpack_from("<I", data, BLOCK - 4)
        expect("bitmap crc32", crc, zlib.crc32(data[:BLOCK - 4]))
        expect("bitmap bits in range", True, nbits <= MAX_REGIONS)
        return cls(events, retired, region, nbits, bytes(data[_HEAD.size:BLOCK - 4]))
