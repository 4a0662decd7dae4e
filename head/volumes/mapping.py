"""The hashed mapping table: (volume, segment) -> physical segment, with
versions for copy-on-write snapshots.

On disk it is one 32-byte entry per physical segment (`records.ENTRY_DTYPE`):
owner volume, logical segment, and the epochs the version lived in. Each
volume has a write *epoch*; taking a snapshot freezes the current epoch E and
moves the volume to E+1. A snapshot at E sees, for each logical segment, the
version with birth <= E < death; the volume sees the live one (death = LIVE).

In memory every volume has a `Lineage`: hash maps from logical segment to the
live physical segment and to the older versions kept for snapshots, and the
sorted snapshot epochs. Deciding whether a write may go in place is O(1):
the live version is shared iff the newest snapshot epoch >= its birth. So a
write never costs more with more snapshots; snapshot deletion frees the
versions no remaining snapshot sees.

This module changes the table in memory and tracks dirty pages; it does no I/O.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

import numpy as np

from head.volumes.errors import IntegrityError
from head.volumes.records import (ENTRY_DTYPE, KIND_TABLE, LIVE, TABLE_PER_PAGE,
                                  page_from_bytes, page_to_bytes)

log = logging.getLogger(__name__)


@dataclass
class Lineage:
    """One volume's versions. `snaps` is sorted; every snapshot epoch < `epoch`."""

    epoch: int
    snaps: list[int] = field(default_factory=list)
    live: dict[int, int] = field(default_factory=dict)
    history: dict[int, list[int]] = field(default_factory=dict)  # oldest first


class SegmentTable:
    """Entries for `count` physical segments, stored from metadata page `first_page`."""

    def __init__(self, count: int, first_page: int) -> None:
        self.count = count
        self.first_page = first_page
        self.entries = np.zeros(count, dtype=ENTRY_DTYPE)
        self.lineages: dict[int, Lineage] = {}
        self.dirty_pages: set[int] = set()   # metadata page numbers
        self.orphans: list[int] = []         # entries owned by no known volume

    # -- pages -----------------------------------------------------------
    @property
    def pages(self) -> int:
        return -(-self.count // TABLE_PER_PAGE)

    def load_page(self, page_no: int, page: bytes) -> None:
        index = page_no - self.first_page
        payload = page_from_bytes(KIND_TABLE, page_no, page)
        lo = index * TABLE_PER_PAGE
        hi = min(self.count, lo + TABLE_PER_PAGE)
        self.entries[lo:hi] = np.frombuffer(payload, dtype=ENTRY_DTYPE, count=hi - lo)

    def page_image(self, page_no: int) -> bytes:
        lo = (page_no - self.first_page) * TABLE_PER_PAGE
        hi = min(self.count, lo + TABLE_PER_PAGE)
        return page_to_bytes(KIND_TABLE, page_no, self.entries[lo:hi].tobytes())

    def _touch(self, phys: int) -> None:
        self.dirty_pages.add(self.first_page + phys // TABLE_PER_PAGE)

    # -- index -----------------------------------------------------------
    def build_index(self, epochs: dict[int, tuple[int, list[int]]]) -> list[int]:
        """Index the loaded entries for volumes {id: (epoch, snapshot epochs)}.

        Returns the free physical segments. Entries of unknown volumes go to
        `orphans`; duplicate live versions raise IntegrityError.
        """
        self.lineages = {vid: Lineage(epoch, sorted(snaps)) for vid, (epoch, snaps) in epochs.items()}
        self.orphans = []
        owners = self.entries["volume"]
        owned = np.flatnonzero(owners)
        columns = zip(owned.tolist(), owners[owned].tolist(),
                      self.entries["logical"][owned].tolist(),
                      self.entries["death"][owned].tolist())
        for phys, vid, logical, death in columns:
            lin = self.lineages.get(vid)
            if lin is None:
                self.orphans.append(phys)
            elif death != LIVE:
                lin.history.setdefault(logical, []).append(phys)
            elif logical in lin.live:
                raise IntegrityError(f"segment {phys}: expected the only live version of "
                                     f"{vid}/{logical}, got a second one "
                                     f"(segment {lin.live[logical]})")
            else:
                lin.live[logical] = phys
        for lin in self.lineages.values():
            for versions in lin.history.values():
                versions.sort(key=self.birth)
        return np.flatnonzero(owners == 0).tolist()

    # -- lookups ---------------------------------------------------------
    def birth(self, phys: int) -> int:
        return int(self.entries[phys]["birth"])

    def death(self, phys: int) -> int:
        return int(self.entries[phys]["death"])

    def visible(self, vid: int, logical: int, epoch: int | None = None) -> int | None:
        """The physical segment the volume (epoch None) or its snapshot at `epoch` reads."""
        lin = self.lineages[vid]
        phys = lin.live.get(logical)
        if epoch is None:
            return phys
        if phys is not None and self.birth(phys) <= epoch:
            return phys
        versions = lin.history.get(logical, ())
        i = bisect.bisect_right(versions, epoch, key=self.birth)   # births increase
        if i and epoch < self.death(versions[i - 1]):
            return versions[i - 1]
        return None

    def shared(self, vid: int, phys: int) -> bool:
        """True if a snapshot sees live segment `phys`, so a write must not touch it."""
        snaps = self.lineages[vid].snaps
        return bool(snaps) and snaps[-1] >= self.birth(phys)

    def _seen(self, snaps: list[int], birth: int, death: int) -> bool:
        i = bisect.bisect_left(snaps, birth)
        return i < len(snaps) and snaps[i] < death

    def logicals(self, vid: int) -> set[int]:
        lin = self.lineages[vid]
        return set(lin.live) | set(lin.history)

    def changed(self, vid: int, since: int, until: int | None) -> list[int]:
        """Logical segments whose content differs between snapshot epoch `since`
        and `until` (a later snapshot epoch, or None for the live volume)."""
        out = []
        for logical in sorted(self.logicals(vid)):
            now = self.visible(vid, logical, until)
            then = self.visible(vid, logical, since)
            if now != then:
                out.append(logical)
        return out

    def mapped(self, vid: int, epoch: int | None) -> list[int]:
        return [lg for lg in sorted(self.logicals(vid)) if self.visible(vid, lg, epoch) is not None]

    def exclusive(self, vid: int, epoch: int) -> int:
        """Segments only the snapshot at `epoch` sees (freed by deleting it)."""
        lin = self.lineages[vid]
        others = [s for s in lin.snaps if s != epoch]
        count = 0
        for versions in lin.history.values():
            for phys in versions:
                b, d = self.birth(phys), self.death(phys)
                if b <= epoch < d and not self._seen(others, b, d):
                    count += 1
        return count

    # -- changes ---------------------------------------------------------
    def add_volume(self, vid: int, epoch: int) -> None:
        self.lineages[vid] = Lineage(epoch)

    def place(self, vid: int, logical: int, phys: int) -> list[int]:
        """Make free segment `phys` the live version of `logical` at the volume's
        epoch; the old live version is kept for snapshots or returned as freed."""
        lin = self.lineages[vid]
        freed = self.unmap(vid, logical)
        self.entries[phys] = (vid, 0, logical, lin.epoch, LIVE)
        self._touch(phys)
        lin.live[logical] = phys
        return freed

    def unmap(self, vid: int, logical: int) -> list[int]:
        """Drop the live version of `logical`; returns it if no snapshot needs it."""
        lin = self.lineages[vid]
        phys = lin.live.pop(logical, None)
        if phys is None:
            return []
        if self.shared(vid, phys):
            self.entries[phys]["death"] = lin.epoch
            self._touch(phys)
            lin.history.setdefault(logical, []).append(phys)
            return []
        self._clear(phys)
        return [phys]

    def _clear(self, phys: int) -> None:
        self.entries[phys] = (0, 0, 0, 0, 0)
        self._touch(phys)

    def add_snapshot(self, vid: int) -> int:
        """Freeze the volume's current epoch as a snapshot; returns that epoch."""
        lin = self.lineages[vid]
        epoch = lin.epoch
        lin.snaps.append(epoch)
        lin.epoch += 1
        return epoch

    def drop_snapshot(self, vid: int, epoch: int) -> list[int]:
        """Forget the snapshot at `epoch`; returns the segments nobody sees any more."""
        lin = self.lineages[vid]
        lin.snaps.remove(epoch)
        freed = []
        for logical in list(lin.history):
            keep = []
            for phys in lin.history[logical]:
                b, d = self.birth(phys), self.death(phys)
                if b <= epoch < d and not self._seen(lin.snaps, b, d):
                    self._clear(phys)
                    freed.append(phys)
                else:
                    keep.append(phys)
            if keep:
                lin.history[logical] = keep
            else:
                del lin.history[logical]
        return freed

    def drop_volume(self, vid: int) -> list[int]:
        """Forget a volume without snapshots; returns all its segments."""
        lin = self.lineages.pop(vid)
        freed = list(lin.live.values()) + [p for v in lin.history.values() for p in v]
        for phys in freed:
            self._clear(phys)
        return freed

    def truncate(self, vid: int, segments: int) -> list[int]:
        """Unmap live versions at logical >= `segments` (volume shrink)."""
        freed = []
        for logical in [lg for lg in self.lineages[vid].live if lg >= segments]:
            freed += self.unmap(vid, logical)
        return freed

    # -- fsck ------------------------------------------------------------
    def check(self, sizes: dict[int, int]) -> list[str]:
        """Problems between entries and index; `sizes` is volume id -> segments."""
        problems = [f"segment {p}: owned by unknown volume {int(self.entries[p]['volume'])}"
                    for p in self.orphans]
        indexed: dict[int, tuple[int, int]] = {}

        def claim(phys: int, vid: int, logical: int) -> None:
            if phys in indexed:
                problems.append(f"segment {phys}: double-owned by {indexed[phys]} "
                                f"and {vid}/{logical}")
            indexed[phys] = (vid, logical)

        for vid, lin in self.lineages.items():
            for logical, phys in lin.live.items():
                claim(phys, vid, logical)
                if self.death(phys) != LIVE:
                    problems.append(f"segment {phys}: live for {vid}/{logical} but dead on disk")
                if logical >= sizes.get(vid, 0):
                    problems.append(f"segment {phys}: {vid}/{logical} beyond the volume's end")
            for logical, versions in lin.history.items():
                for phys in versions:
                    claim(phys, vid, logical)
                    b, d = self.birth(phys), self.death(phys)
                    if not b < d:
                        problems.append(f"segment {phys}: birth {b} not before death {d}")
                    if not self._seen(lin.snaps, b, d):
                        problems.append(f"segment {phys}: leaked, {vid}/{logical} epochs "
                                        f"[{b}, {d}) seen by no snapshot")
        for phys, (vid, logical) in indexed.items():
            e = self.entries[phys]
            if (int(e["volume"]), int(e["logical"])) != (vid, logical):
                problems.append(f"segment {phys}: indexed as {vid}/{logical}, entry says "
                                f"{int(e['volume'])}/{int(e['logical'])}")
        owned = int(np.count_nonzero(self.entries["volume"]))
        if owned != len(indexed) + len(self.orphans):
            problems.append(f"table: expected {len(indexed) + len(self.orphans)} owned entries, "
                            f"got {owned}")
        return problems
