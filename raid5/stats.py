"""Counters of an array for humans: self-heal repairs and unrecoverable blocks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ArrayStats:
    """Self-heal repairs by member name, and blocks that could not be repaired."""

    repaired: Counter = field(default_factory=Counter)
    unrecoverable: int = 0

    def note_repair(self, member: str) -> None:
        self.repaired[member] += 1
