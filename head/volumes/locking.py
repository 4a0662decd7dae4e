"""Ordering for the volume data path: per-segment locks and a write gate.

Loop-only: use from the event loop that owns the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager


class SegmentLocks:
    """One mutex per logical segment of a volume, created on demand.

    `hold` takes the locks of several segments in ascending order, so two
    writes spanning the same segments cannot deadlock; a write, its
    copy-on-write and its mapping update happen under the lock.
    """

    def __init__(self) -> None:
        self._locks: dict[int, list] = {}   # segment -> [lock, users]

    @asynccontextmanager
    async def hold(self, segments: Iterable[int]) -> AsyncIterator[None]:
        registered: list[int] = []
        acquired: list[int] = []
        try:
            for seg in sorted(set(segments)):
                slot = self._locks.setdefault(seg, [asyncio.Lock(), 0])
                slot[1] += 1
                registered.append(seg)
                await slot[0].acquire()
                acquired.append(seg)
            yield
        finally:
            for seg in reversed(acquired):
                self._locks[seg][0].release()
            for seg in registered:
                slot = self._locks[seg]
                slot[1] -= 1
                if slot[1] == 0:
                    del self._locks[seg]


class WriteGate:
    """Lets writes run concurrently until a freeze: `frozen()` stops new
    writes and waits for those in flight to return (for snapshots)."""

    def __init__(self) -> None:
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()

    @asynccontextmanager
    async def writer(self) -> AsyncIterator[None]:
        while not self._open.is_set():
            await self._open.wait()
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    @asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """Exclusive; callers serialize freezes among themselves."""
        self._open.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._open.set()
