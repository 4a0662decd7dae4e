"""The hashed mapping table: (volume, segment) -> physical segment, with
versions for copy-on-write snapshots.

On disk it is one 64-byte entry per physical segment (`records.ENTRY_DTYPE`):
owner volume, logical segment, the epochs the version lived in, and for a
*partial* version the bitmap of the blocks it holds. Each
volume has a write *epoch*; taking a snapshot freezes the current epoch E and
moves the volume to E+1. A snapshot at E sees, for each logical segment, the
version with birth <= E < death; the volume sees the live one (death = LIVE).

In memory every volume has a `Lineage`: hash maps from logical segment to the
live physical segment and to the older versions kept for snapshots, and the
sorted snapshot epochs. Deciding whether a write may go in place is O(1):
the live version is shared iff the newest snapshot epoch >= its birth. So a
write never costs more with more snapshots; snapshot deletion frees the
versions no remaining snapshot sees.

Sub-segment copy-on-write: the first write after a snapshot places a new
version holding only the blocks written (FLAG_PARTIAL); its other blocks read
through to the previous version (FLAG_BACKED: the version whose death is its
birth), which a snapshot keeps anyway. `chain()` gives the versions a view
reads, top first. Later writes fill the partial version in place; when its
bitmap is full it stands alone. Deleting a snapshot that frees a version a
kept partial version reads through first merges the missing blocks into the
partial one (`plan_drop` says which; the pool copies; `apply_drop` commits).

This module changes the table in memory and tracks dirty pages; it does no I/O.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

import numpy as np

from opie.head.volumes.errors import IntegrityError
from opie.head.volumes.records import (BITMAP_BITS, ENTRY_DTYPE, FLAG_BACKED, FLAG_PARTIAL,
                                  KIND_TABLE, LIVE, TABLE_PER_PAGE, page_from_bytes,
                                  page_to_bytes)

log = logging.getLogger(__name__)

WORD = (1 << 64) - 1
# (physical segment, bitmap of the blocks it holds), top version first
Chain = list[tuple[int, int]]


def block_mask(first: int, last: int) -> int:
    """Bits first..last-1."""
    return ((1 << last) - 1) ^ ((1 << first) - 1)


def _words(bits: int) -> list[int]:
    return [(bits >> (64 * i)) & WORD for i in range(BITMAP_BITS // 64)]


@dataclass
class Lineage:
    """One volume's versions. `snaps` is sorted; every snapshot epoch < `epoch`."""

    epoch: int
    snaps: list[int] = field(default_factory=list)
    live: dict[int, int] = field(default_factory=dict)
    history: dict[int, list[int]] = field(default_factory=dict)  # oldest first


class SegmentTable:
    """Entries for `count` physical segments, stored from metadata page
    `first_page`; a segment is `blocks` bitmap blocks."""

    def __init__(self, count: int, first_page: int, blocks: int = 1) -> None:
        self.count = count
        self.first_page = first_page
        self.blocks = blocks
        self.full = block_mask(0, blocks)
        self.entries = np.zeros(count, dtype=ENTRY_DTYPE)
        self.partial: dict[int, int] = {}    # physical segment -> bitmap, partial versions
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
        self.partial = {}
        for phys in np.flatnonzero(self.entries["flags"] & FLAG_PARTIAL).tolist():
            words = self.entries["bitmap"][phys].tolist()
            self.partial[phys] = sum(w << (64 * i) for i, w in enumerate(words))
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

    def bits(self, phys: int) -> int:
        """The blocks version `phys` holds itself."""
        return self.partial.get(phys, self.full)

    def below(self, vid: int, logical: int, phys: int) -> int | None:
        """The version a partial `phys` reads its missing blocks from; None: zeros."""
        if phys not in self.partial or not int(self.entries[phys]["flags"]) & FLAG_BACKED:
            return None
        birth = self.birth(phys)
        versions = self.lineages[vid].history.get(logical, ())
        i = bisect.bisect_left(versions, birth, key=self.birth)
        if i and self.death(versions[i - 1]) == birth:
            return versions[i - 1]
        raise IntegrityError(f"segment {phys}: expected a version of {vid}/{logical} dying at "
                             f"epoch {birth} to read through to, got none")

    def chain_from(self, vid: int, logical: int, phys: int | None) -> Chain:
        """Version `phys` and those its missing blocks come from; [] for a hole."""
        out = []
        while phys is not None:
            bits = self.partial.get(phys, self.full)
            out.append((phys, bits))
            if bits == self.full:
                break
            phys = self.below(vid, logical, phys)
        return out

    def chain(self, vid: int, logical: int, epoch: int | None = None) -> Chain:
        """What the volume (epoch None) or its snapshot at `epoch` reads of `logical`."""
        return self.chain_from(vid, logical, self.visible(vid, logical, epoch))

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

    def place(self, vid: int, logical: int, phys: int, bits: int | None = None,
              backed: bool = False) -> list[int]:
        """Make free segment `phys` the live version of `logical` at the volume's
        epoch; the old live version is kept for snapshots or returned as freed.
        With `bits` (not all blocks) the version is partial: the rest reads
        through to the old live version if `backed` (it must be shared, so a
        snapshot keeps it), else as zeros."""
        lin = self.lineages[vid]
        had = logical in lin.live
        freed = self.unmap(vid, logical)
        if bits is None or bits == self.full:
            self.entries[phys] = (vid, 0, logical, lin.epoch, LIVE, _words(0))
            self.partial.pop(phys, None)
        else:
            if backed and (freed or not had):
                raise RuntimeError(f"{vid}/{logical}: a partial version can only read "
                                   f"through to a shared live version")
            flags = FLAG_PARTIAL | (FLAG_BACKED if backed else 0)
            self.entries[phys] = (vid, flags, logical, lin.epoch, LIVE, _words(bits))
            self.partial[phys] = bits
        self._touch(phys)
        lin.live[logical] = phys
        return freed

    def fill(self, phys: int, bits: int) -> bool:
        """Version `phys` now holds `bits` too (their data is on the device);
        True if its entry changed."""
        old = self.partial.get(phys)
        if old is None or old | bits == old:
            return False
        self._set_bits(phys, old | bits)
        return True

    def _set_bits(self, phys: int, bits: int) -> None:
        if bits == self.full:
            del self.partial[phys]
            self.entries[phys]["flags"] = 0
            self.entries["bitmap"][phys] = 0
        else:
            self.partial[phys] = bits
            self.entries["bitmap"][phys] = _words(bits)
        self._touch(phys)

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
        self.entries[phys] = (0, 0, 0, 0, 0, _words(0))
        self.partial.pop(phys, None)
        self._touch(phys)

    def add_snapshot(self, vid: int) -> int:
        """Freeze the volume's current epoch as a snapshot; returns that epoch."""
        lin = self.lineages[vid]
        epoch = lin.epoch
        lin.snaps.append(epoch)
        lin.epoch += 1
        return epoch

    def plan_drop(self, vid: int, epoch: int) -> tuple[list[int], list[tuple[int, Chain]]]:
        """What forgetting the snapshot at `epoch` frees, and the merges that must
        be on the device first: (freed segments, [(kept partial version, the
        chain its missing blocks come from now)]). Changes nothing."""
        lin = self.lineages[vid]
        others = [s for s in lin.snaps if s != epoch]
        freed: list[int] = []
        merges: list[tuple[int, Chain]] = []
        for logical, versions in lin.history.items():
            gone = {p for p in versions
                    if self.birth(p) <= epoch < self.death(p)
                    and not self._seen(others, self.birth(p), self.death(p))}
            if not gone:
                continue
            freed += [p for p in versions if p in gone]
            kept = [p for p in versions if p not in gone]
            if logical in lin.live:
                kept.append(lin.live[logical])
            for phys in kept:
                under = self.below(vid, logical, phys)
                if under in gone:
                    merges.append((phys, self.chain_from(vid, logical, under)))
        return freed, merges

    def apply_drop(self, vid: int, epoch: int, freed: list[int], merged: list[int]) -> list[int]:
        """Forget the snapshot at `epoch` as `plan_drop` said, once the `merged`
        versions hold every block; returns `freed`."""
        lin = self.lineages[vid]
        lin.snaps.remove(epoch)
        for phys in merged:
            self._set_bits(phys, self.full)
        gone = set(freed)
        for logical in {int(self.entries[p]["logical"]) for p in freed}:
            keep = [p for p in lin.history[logical] if p not in gone]
            if keep:
                lin.history[logical] = keep
            else:
                del lin.history[logical]
        for phys in freed:
            self._clear(phys)
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

        for phys, bits in self.partial.items():
            if bits & ~self.full or not bits:
                problems.append(f"segment {phys}: bitmap {bits:#x} outside 1..{self.full:#x}")
        for vid, lin in self.lineages.items():
            for logical in set(lin.live) | set(lin.history):
                for phys in lin.history.get(logical, []) + [lin.live.get(logical)]:
                    if phys is None:
                        continue
                    flags = int(self.entries[phys]["flags"])
                    if phys not in self.partial and flags:
                        problems.append(f"segment {phys}: flags {flags} on a whole version")
                    try:
                        self.below(vid, logical, phys)
                    except IntegrityError as exc:
                        problems.append(str(exc))
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
