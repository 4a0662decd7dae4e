"""The partial-parity log ring of one member.

Records are appended at 4 KiB-aligned positions, in order, wrapping to the
start when the end is reached. Contract: a record's space stays reserved
until the array has made its stripe update durable (a flush) and recorded
that in the bitmap's retired seq, so a record that a crash could still need
is never overwritten; `append` returns only once the record is durable (FUA).
When the ring is full of completed records it asks the array to `make_room`
(a flush), rather than wait for the caller's next flush.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Awaitable, Callable

from .errors import IntegrityError
from .geometry import BLOCK, PPL_OFFSET
from .ppl import PPLRecord

log = logging.getLogger(__name__)


@dataclass
class _Reservation:
    start: int
    end: int
    seq: int
    record: PPLRecord
    done: bool = False


class PPLRing:
    def __init__(self, name: str, size: int, write, make_room: Callable[[], Awaitable[None]]
                 ) -> None:
        self.name = name
        self.size = size
        self._write = write              # async (offset, data, fua) -> None
        self._make_room = make_room
        self._head = 0
        self._busy: dict[int, _Reservation] = {}
        self._cond = asyncio.Condition()

    def _blocked(self, start: int, end: int) -> list[_Reservation]:
        return [r for r in self._busy.values() if start < r.end and r.start < end]

    async def append(self, record: PPLRecord, payload: bytes) -> int:
        """Write `record` + `payload` durably; returns the record's seq as its ticket."""
        length = record.length
        if length > self.size:
            raise ValueError(f"{self.name}: ppl record of {length} bytes exceeds ring {self.size}")
        while True:
            async with self._cond:
                start = self._head if self._head + length <= self.size else 0
                blockers = self._blocked(start, start + length)
                if not blockers:
                    self._head = start + length
                    self._busy[record.seq] = _Reservation(start, start + length, record.seq, record)
                    break
                if not any(r.done for r in blockers):
                    await self._cond.wait()
                    continue
            await self._make_room()
        try:
            await self._write(PPL_OFFSET + start, record.to_bytes() + payload, True)
        except BaseException:
            async with self._cond:
                self._busy.pop(record.seq, None)
                self._cond.notify_all()
            raise
        return record.seq

    async def complete(self, seq: int) -> None:
        """The stripe update of record `seq` has been written (not yet flushed)."""
        async with self._cond:
            if seq in self._busy:
                self._busy[seq].done = True
            self._cond.notify_all()

    async def mark_durable(self, seq: int) -> None:
        """Rewrite record `seq`'s header as DONE (FUA): its update is durable and
        must not be replayed, though its rows still hide older records."""
        res = self._busy.get(seq)
        if res is not None:
            header = replace(res.record, done=True).to_bytes()
            await self._write(PPL_OFFSET + res.start, header, True)

    async def retire(self, upto: int) -> None:
        """Records up to seq `upto` are durably obsolete: their space may be reused."""
        async with self._cond:
            for seq in [s for s, r in self._busy.items() if r.done and s <= upto]:
                del self._busy[seq]
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
        payload = raw[pos + BLOCK:pos + rec.length]
        try:
            rec.check_payload(payload)
        except IntegrityError as exc:
            log.info("ppl record at %d ignored: %s", pos, exc)
            continue
        found.append((pos, rec, payload))
    return found
