"""Free data segments of a pool.

A segment freed by a metadata change (snapshot delete, trim, shrink) is
*pending* until the commit that frees it is durable: until then the last
committed table still points at it, so it must not be overwritten. Lowest
segments are handed out first, which keeps a fresh volume roughly sequential.
"""

from __future__ import annotations

import errno
import heapq
from collections.abc import Iterable


class SegmentAllocator:
    def __init__(self, free: Iterable[int]) -> None:
        self._free = list(free)
        heapq.heapify(self._free)
        self.pending: list[int] = []

    @property
    def available(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        """`n` free segments, or OSError(ENOSPC) and nothing taken."""
        if n > len(self._free):
            raise OSError(errno.ENOSPC, f"pool full: need {n} segments, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def give_back(self, segments: Iterable[int]) -> None:
        """Return segments that no committed metadata refers to."""
        for seg in segments:
            heapq.heappush(self._free, seg)

    def defer(self, segments: Iterable[int]) -> None:
        """Segments freed in memory; reusable after the next commit."""
        self.pending.extend(segments)

    def detach_pending(self) -> list[int]:
        out, self.pending = self.pending, []
        return out

    def free_list(self) -> list[int]:
        return list(self._free)
