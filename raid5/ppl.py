"""Partial-parity log (PPL) records: how a stripe's parity is made consistent
after a crash cut its update, which closes the RAID5 write hole.

Before a stripe update touches any data or parity, the array writes (FUA) a
record to the log ring of the stripe's parity member. For each row (4 KiB
block index within the chunk) of the update's window, the partial parity is
the XOR of the old data of the chunks that the update leaves untouched in
that row. After a crash, parity_row = partial_row XOR (current contents of the
modified blocks of that row) is consistent with whatever reached the modified
blocks, and so the untouched blocks stay recoverable from parity.

A record is live until a flush has made its update durable and the bitmap
says so (its retired seq); a FUA update rewrites its record as DONE. For each
row only the newest live record covering it is replayed. The untouched
blocks a record's partial parity is made of are flushed before the record
is written, so a crash cannot roll them back under it. A block the update
only partly covers (at most two per update) is an *edge*: its old contents
follow the partial parity, so a replay that finds the block's member gone
can still keep the bytes the update did not touch.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .errors import expect
from .geometry import BLOCK, MAX_MEMBERS

PPL_MAGIC = b"O5PL"
PPL_VERSION = 1
FLAG_FULL = 1
FLAG_DONE = 2

# PPL record header, one 4 KiB block in the ring, followed by `rows` 4 KiB
# blocks of partial parity (none when FULL), then the old contents of each
# edge block, little-endian:
#   0  4s   magic b"O5PL"
#   4  H    version (1)
#   6  H    flags (bit 0 FULL: every block of the window is modified, no partial parity;
#           bit 1 DONE: the update is durable (FUA), its rows need no replay)
#   8  16s  array uuid
#  24  I    ppl generation (must match the member's superblock)
#  28  I    first row of the window (block index within the chunk)
#  32  I    rows in the window
#  36  I    crc32 of the payload
#  40  Q    sequence number (per row, the newest live record covering it wins)
#  48  Q    stripe
#  56  124s per data chunk i: H lo, H hi = modified rows [lo, hi) (lo == hi: none)
# 180  B    edge blocks (0..2)
# 181  3x   reserved
# 184  8s   per edge block: H data index, H row
# 192  I    crc32 of bytes 0..191
_HEAD = struct.Struct("<4sHH16sIIIIQQ124sB3x8s")
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class PPLRecord:
    array_uuid: bytes
    generation: int
    seq: int
    stripe: int
    first_row: int
    rows: int
    modified: tuple[tuple[int, int], ...]
    full: bool
    payload_crc: int
    edges: tuple[tuple[int, int], ...] = ()
    done: bool = False

    @property
    def pp_length(self) -> int:
        return 0 if self.full else BLOCK * self.rows

    @property
    def length(self) -> int:
        """Bytes in the ring: header, partial parity, edge blocks."""
        return BLOCK + self.pp_length + BLOCK * len(self.edges)

    def to_bytes(self) -> bytes:
        ranges = b"".join(struct.pack("<HH", lo, hi) for lo, hi in self.modified)
        edges = b"".join(struct.pack("<HH", i, row) for i, row in self.edges)
        flags = (FLAG_FULL if self.full else 0) | (FLAG_DONE if self.done else 0)
        head = _HEAD.pack(PPL_MAGIC, PPL_VERSION, flags,
                          self.array_uuid, self.generation, self.first_row, self.rows,
                          self.payload_crc, self.seq, self.stripe, ranges.ljust(124, b"\0"),
                          len(self.edges), edges.ljust(8, b"\0"))
        return (head + _CRC.pack(zlib.crc32(head))).ljust(BLOCK, b"\0")

    @classmethod
    def from_bytes(cls, data: bytes, data_chunks: int) -> "PPLRecord":
        expect("ppl header length", True, len(data) >= _HEAD.size + _CRC.size)
        (magic, version, flags, array_uuid, generation, first_row, rows, payload_crc,
         seq, stripe, ranges, nedges, edges) = _HEAD.unpack_from(data)
        expect("ppl magic", PPL_MAGIC, magic)
        expect("ppl version", PPL_VERSION, version)
        (crc,) = _CRC.unpack_from(data, _HEAD.size)
        expect("ppl header crc32", crc, zlib.crc32(data[:_HEAD.size]))
        expect("ppl data chunks in range", True, 1 <= data_chunks < MAX_MEMBERS)
        expect("ppl edge count in range", True, nedges <= 2)
        modified = tuple(struct.unpack_from("<HH", ranges, 4 * i) for i in range(data_chunks))
        return cls(array_uuid, generation, seq, stripe, first_row, rows, modified,
                   bool(flags & FLAG_FULL), payload_crc,
                   tuple(struct.unpack_from("<HH", edges, 4 * i) for i in range(nedges)),
                   bool(flags & FLAG_DONE))

    def check_payload(self, payload: bytes) -> None:
        expect("ppl payload crc32", self.payload_crc, zlib.crc32(payload))
