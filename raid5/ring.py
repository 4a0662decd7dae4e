"""The partial-parity log ring of one member.

Records are appended at 4 KiB-aligned positions and wrap to the start when
the end is reached. Contract: a record's space is reserved from `append`
until `release`, so a record whose stripe update is still in flight is never
overwritten; `append` returns only once the record is durable (FUA).
"""

from __future__ import annotations

import asyncio
import logging

from .errors import IntegrityError
from .geometry import BLOCK, PPL_OFFSET
from .ppl import PPLRecord

log = logging.getLogger(__name__)


class PPLRing:
    def __init__(self, name: str, size: int, write) -> None:
        self.name = name
        self.size = size
        self._write = write              # async (offset, data, fua) -> None
        self._head = 0
        self._busy: dict[int, tuple[int, int]] = {}
        self._cond = asyncio.Condition()
        self._ticket = 0

    def _overlaps(self, start: int, end: int) -> bool:
        return any(start < e and s < end for s, e in self._busy.values())

    async def append(self, record: PPLRecord, payload: bytes) -> int:
        """Write `record` + `payload` durably; returns a ticket for `release`."""
        length = record.length
        if length > self.size:
            raise ValueError(f"{self.name}: ppl record of {length} bytes exceeds ring {self.size}")
        async with self._cond:
            while True:
                start = self._head if self._head + length <= self.size else 0
                if not self._overlaps(start, start + length):
                    break
                await self._cond.wait()
            self._head = start + length
            self._ticket += 1
            ticket = self._ticket
            self._busy[ticket] = (start, start + length)
        try:
            await self._write(PPL_OFFSET + start, record.to_bytes() + payload, True)
        except BaseException:
            await self.release(ticket)
            raise
        return ticket

    async def release(self, ticket: int) -> None:
        async with self._cond:
            self._busy.pop(ticket, None)
            self._cond.notify_all()

    def resume_after(self, end: int) -> None:
        """Continue appending after a record found at assembly that ends at `end`."""
        self._head = end % self.size


def scan(raw: bytes, array_uuid: bytes, generation: int, data_chunks: int
         ) -> list[tuple[int, PPLRecord, bytes]]:
    """All valid records of `generation` in a ring image: (position, record, payload)."""
    found: list[tuple[int, PPLRecord, bytes]] = []
    for pos in range(0, len(raw) - BLOCK + 1, BLOCK):
        if raw[pos:pos + 4] != b"O5PL":
            continue
        try:
            rec = PPLRecord.from_bytes(raw[pos:pos + BLOCK], data_chunks)
        except IntegrityError:
            continue
        if rec.array_uuid != array_uuid or rec.generation != generation:
            continue
        payload = b"" if rec.full else raw[pos + BLOCK:pos + rec.length]
        try:
            rec.check_payload(payload)
        except IntegrityError as exc:
            log.info("ppl record at %d ignored: %s", pos, exc)
            continue
        found.append((pos, rec, payload))
    return found
