"""The mirror's frames: the wire format between the active head's sender and
the passive head's receiver, and the record format of the passive's on-disk
copy (the same frames). Pure: bytes in, values out, no I/O; a parser fails
only with `FrameError`.

A frame is a 16-byte header, then `length` bytes of payload. All integers
little-endian.
  off size field
    0    4 magic    b"OPMR"
    4    2 version  1
    6    2 kind     1 FULL, 2 RECORD, 3 ACK, 4 NACK, 5 PING
    8    4 length   payload bytes, at most MAX_PAYLOAD
   12    4 crc32    of the header with this field zeroed, then the payload

Kinds (sender -> receiver: FULL, RECORD, PING; receiver -> sender: ACK, NACK):
  FULL    `Pages`: every metadata page of the pool as of transaction `seq`
          (page numbers 0..n-1); replaces the receiver's copy.
  RECORD  `Pages`: the pages that changed from transaction `base` to `seq`
          (one committed transaction: base = seq - 1); applies only to a
          copy of the same pool at exactly `base`.
  PING    empty; answered with an ACK of what the receiver holds.
  ACK     `Reply`: the receiver's copy is durable at (pool uuid, seq).
  NACK    `Reply` + reason: refused; the copy is unchanged at (uuid, seq).
"""
from __future__ import annotations

import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass, field

from opie.head.ha.errors import FrameError

_HEADER = struct.Struct("<4sHHII")
HEADER_SIZE = _HEADER.size
MAGIC = b"OPMR"
VERSION = 1
FULL, RECORD, ACK, NACK, PING = 1, 2, 3, 4, 5
KINDS = (FULL, RECORD, ACK, NACK, PING)
MAX_PAYLOAD = 256 << 20     # a whole table of ~4 M segments (4 TiB of 1 MiB segments)
PAGE_SIZE = 4096            # a framed metadata page (head.volumes.records.META_BLOCK)
NO_POOL = uuidlib.UUID(int=0)


def _check(what: str, expected: object, got: object) -> None:
    if expected != got:
        raise FrameError(f"{what}: expected {expected!r}, got {got!r}")


def frame(kind: int, payload: bytes) -> bytes:
    """One whole frame of `kind` around `payload`."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind}")
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"frame length: expected <= {MAX_PAYLOAD}, got {len(payload)}")
    head = _HEADER.pack(MAGIC, VERSION, kind, len(payload), 0)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return _HEADER.pack(MAGIC, VERSION, kind, len(payload), crc) + payload


def frame_length(head: bytes) -> int:
    """The whole length of the frame whose first HEADER_SIZE bytes are `head`;
    checks magic, version, kind and the length bound (not the crc)."""
    _check("frame header length", HEADER_SIZE, len(head))
    magic, version, kind, length, _crc = _HEADER.unpack(head)
    _check("frame magic", MAGIC, magic)
    _check("frame version", VERSION, version)
    if kind not in KINDS:
        raise FrameError(f"frame kind: expected one of {KINDS}, got {kind}")
    if length > MAX_PAYLOAD:
        raise FrameError(f"frame length: expected <= {MAX_PAYLOAD}, got {length}")
    return HEADER_SIZE + length


def unframe(data: bytes) -> tuple[int, bytes]:
    """(kind, payload) of one whole frame, every field checked."""
    _check("frame length", frame_length(data[:HEADER_SIZE]), len(data))
    magic, version, kind, length, crc = _HEADER.unpack_from(data)
    head = _HEADER.pack(magic, version, kind, length, 0)
    payload = data[HEADER_SIZE:]
    _check("frame crc32", zlib.crc32(payload, zlib.crc32(head)), crc)
    return kind, payload


# FULL and RECORD payload:
#   off size field
#     0   16 pool uuid
#    16    8 base     RECORD: the transaction the copy must be at; FULL: 0
#    24    8 seq      the transaction the copy is at after this frame
#    32    4 npages
#    36    4 reserved zero
#    40  4*n page numbers (u32, strictly increasing; FULL: 0..n-1)
#     .  4096*n page images, in the same order
_PAGES = struct.Struct("<16sQQI4x")


@dataclass(frozen=True)
class Pages:
    """Metadata pages of pool `pool_uuid` taking a copy from `base` to `seq`."""

    pool_uuid: uuidlib.UUID
    base: int
    seq: int
    pages: dict[int, bytes] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        numbers = sorted(self.pages)
        for n in numbers:
            _check(f"page {n} length", PAGE_SIZE, len(self.pages[n]))
        return b"".join([_PAGES.pack(self.pool_uuid.bytes, self.base, self.seq, len(numbers)),
                         struct.pack(f"<{len(numbers)}I", *numbers),
                         *(self.pages[n] for n in numbers)])

    @classmethod
    def from_bytes(cls, kind: int, data: bytes) -> Pages:
        if len(data) < _PAGES.size:
            raise FrameError(f"pages header length: expected >= {_PAGES.size}, got {len(data)}")
        raw_uuid, base, seq, npages = _PAGES.unpack_from(data)
        _check("pages length", _PAGES.size + npages * (4 + PAGE_SIZE), len(data))
        numbers = struct.unpack_from(f"<{npages}I", data, _PAGES.size)
        if kind == FULL:
            _check("full copy page numbers", tuple(range(npages)), numbers)
            _check("full copy base", 0, base)
        elif any(a >= b for a, b in zip(numbers, numbers[1:])):
            raise FrameError(f"record page numbers: expected strictly increasing, got {numbers}")
        if kind == RECORD and seq <= base:
            raise FrameError(f"record seq: expected > {base}, got {seq}")
        at = _PAGES.size + 4 * npages
        pages = {n: data[at + i * PAGE_SIZE:at + (i + 1) * PAGE_SIZE] for i, n in enumerate(numbers)}
        return cls(uuidlib.UUID(bytes=raw_uuid), base, seq, pages)

    def frame(self, kind: int) -> bytes:
        return frame(kind, self.to_bytes())


# ACK and NACK payload:
#   off size field
#     0   16 pool uuid  of the receiver's copy (zero: it has none)
#    16    8 seq        the transaction the receiver's copy is at
#    24    .  reason    NACK only: utf-8, why the frame was refused
_REPLY = struct.Struct("<16sQ")


@dataclass(frozen=True)
class Reply:
    """What the receiver holds after a frame, and whether it took it."""

    ok: bool
    pool_uuid: uuidlib.UUID
    seq: int
    reason: str = ""

    def frame(self) -> bytes:
        tail = b"" if self.ok else self.reason.encode()
        return frame(ACK if self.ok else NACK, _REPLY.pack(self.pool_uuid.bytes, self.seq) + tail)

    @classmethod
    def from_bytes(cls, kind: int, data: bytes) -> Reply:
        if kind not in (ACK, NACK):
            raise FrameError(f"reply kind: expected {ACK} or {NACK}, got {kind}")
        if len(data) < _REPLY.size or (kind == ACK and len(data) != _REPLY.size):
            raise FrameError(f"reply length: expected {_REPLY.size}, got {len(data)}")
        raw_uuid, seq = _REPLY.unpack_from(data)
        reason = data[_REPLY.size:].decode(errors="replace")
        return cls(kind == ACK, uuidlib.UUID(bytes=raw_uuid), seq, reason)
