"""Per-stripe locks: one operation (write, degraded read, rebuild, resync,
scrub) owns a stripe at a time, so overlapping writes are serialized."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator


class StripeLocks:
    def __init__(self) -> None:
        self._locks: dict[int, asyncio.Lock] = {}
        self._users: dict[int, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, stripe: int) -> AsyncIterator[None]:
        lock = self._locks.setdefault(stripe, asyncio.Lock())
        self._users[stripe] = self._users.get(stripe, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[stripe] -= 1
            if not self._users[stripe]:
                del self._users[stripe]
                del self._locks[stripe]
