"""The member superblock: who the member is and what state the array is in."""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, replace

from .errors import expect
from .geometry import BLOCK, MAX_MEMBERS, Geometry


class MemberState(enum.IntEnum):
    """State of one role as recorded in the superblock."""

    EMPTY = 0       # slot unused (role >= members)
    IN_SYNC = 1     # holds valid chunks for every stripe
    FAULTY = 2      # failed or removed; writes it misses are kept in the bitmap
    REBUILDING = 3  # replacement: valid below its recovery stripe only
    RESYNCING = 4   # returned after an absence: valid outside the bitmap's dirty regions


SB_MAGIC = b"OPR5"
SB_VERSION = 1
FLAG_CLEAN = 1

# Superblock, member offset 0, one 4 KiB block, little-endian:
#   0  4s   magic b"OPR5"
#   4  H    version (1)
#   6  H    flags (bit 0: array stopped cleanly)
#   8  16s  array uuid
#  24  16s  member uuid
#  40  H    role of this member
#  42  H    members
#  44  I    chunk size
#  48  I    region stripes (write-intent bitmap granularity)
#  52  I    ppl size
#  56  Q    events (bumped on every change of role states)
#  64  Q    stripes
#  72  Q    recovery stripe: this member's chunks are valid below it
#  80  Q    scrub stripe: scrub checkpoint (0 when no scrub is running)
#  88  I    ppl generation: log records of other generations are ignored
#  92  I    reserved (0)
#  96  32s  role states, one MemberState byte per role
# 128  512s role uuids, 16 bytes per role (the member uuid that holds it)
# 640  I    crc32 of bytes 0..639
# 644..4095 zero
_SB = struct.Struct("<4sHH16s16sHHIIIQQQQII32s512s")
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class Superblock:
    array_uuid: bytes
    member_uuid: bytes
    role: int
    members: int
    chunk_size: int
    region_stripes: int
    ppl_size: int
    events: int
    stripes: int
    recovery_stripe: int
    scrub_stripe: int
    ppl_generation: int
    role_states: tuple[MemberState, ...]
    role_uuids: tuple[bytes, ...]
    clean: bool = False

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.members, self.chunk_size, self.stripes, self.ppl_size)

    def evolve(self, **changes: object) -> "Superblock":
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        states = bytes(int(s) for s in self.role_states).ljust(MAX_MEMBERS, b"\0")
        uuids = b"".join(self.role_uuids).ljust(16 * MAX_MEMBERS, b"\0")
        body = _SB.pack(SB_MAGIC, SB_VERSION, FLAG_CLEAN if self.clean else 0,
                        self.array_uuid, self.member_uuid, self.role, self.members,
                        self.chunk_size, self.region_stripes, self.ppl_size, self.events,
                        self.stripes, self.recovery_stripe, self.scrub_stripe,
                        self.ppl_generation, 0, states, uuids)
        return (body + _CRC.pack(zlib.crc32(body))).ljust(BLOCK, b"\0")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Superblock":
        expect("superblock length", True, len(data) >= _SB.size + _CRC.size)
        fields = _SB.unpack_from(data)
        expect("superblock magic", SB_MAGIC, fields[0])
        expect("superblock version", SB_VERSION, fields[1])
        (crc,) = _CRC.unpack_from(data, _SB.size)
        expect("superblock crc32", crc, zlib.crc32(data[:_SB.size]))
        (_, _, flags, array_uuid, member_uuid, role, members, chunk, region, ppl_size,
         events, stripes, recovery, scrub, generation, _, states, uuids) = fields
        expect("superblock member count in range", True, 2 <= members <= MAX_MEMBERS)
        return cls(array_uuid=array_uuid, member_uuid=member_uuid, role=role, members=members,
                   chunk_size=chunk, region_stripes=region, ppl_size=ppl_size, events=events,
                   stripes=stripes, recovery_stripe=recovery, scrub_stripe=scrub,
                   ppl_generation=generation,
                   role_states=tuple(MemberState(b) for b in states[:members]),
                   role_uuids=tuple(uuids[16 * i:16 * i + 16] for i in range(members)),
                   clean=bool(flags & FLAG_CLEAN))
