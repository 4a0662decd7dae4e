"""Stripe plans: what to read, what to write and how parity is made, as data.

Nothing here does I/O. `plan_write` looks at one stripe update (which byte
ranges of which data chunks change, which roles are missing) and picks the
mode that reads least; `plan_read` says where a chunk range comes from. The
executor in `stripe.py` performs the plan. Ranges are chunk-relative bytes.

Rows are 4 KiB block indexes within a chunk; the *window* of an update is the
span of rows any data chunk modifies, and parity is rewritten over exactly
that window.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .geometry import BLOCK, Geometry


class WriteMode(enum.Enum):
    FULL_STRIPE = "full-stripe"              # every block of the window is new: read nothing
    READ_MODIFY_WRITE = "read-modify-write"  # read old data of modified blocks + old parity
    RECONSTRUCT_WRITE = "reconstruct-write"  # read the untouched data blocks of the window
    DEGRADED_WRITE = "degraded-write"        # a modified chunk's member is missing: read all survivors
    DATA_ONLY = "data-only"                  # parity member missing: write data, no parity


@dataclass(frozen=True)
class Extent:
    """`length` bytes at `start` within the stripe's chunk on member `role`."""

    role: int
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class WritePlan:
    stripe: int
    mode: WriteMode
    parity_role: int
    window: tuple[int, int]                  # bytes [lo, hi), block aligned
    modified: tuple[tuple[int, int], ...]    # per data index: bytes [lo, hi) written (lo == hi: none)
    reads: tuple[Extent, ...]
    missing: int | None                      # role that is not written (and not read)
    log: bool                                # a partial-parity record must precede the writes

    @property
    def read_bytes(self) -> int:
        return sum(e.length for e in self.reads)

    def modified_blocks(self, index: int) -> tuple[int, int]:
        """Block-aligned bytes [lo, hi) of data chunk `index` that are rewritten."""
        lo, hi = self.modified[index]
        if lo == hi:
            return (0, 0)
        return (lo // BLOCK * BLOCK, -(-hi // BLOCK) * BLOCK)


def _edges(lo: int, hi: int) -> list[tuple[int, int]]:
    """Blocks only partly covered by [lo, hi): their old bytes must be read."""
    out: list[tuple[int, int]] = []
    if lo % BLOCK:
        out.append((lo // BLOCK * BLOCK, lo // BLOCK * BLOCK + BLOCK))
    if hi % BLOCK:
        last = (hi // BLOCK * BLOCK, hi // BLOCK * BLOCK + BLOCK)
        if not out or out[0] != last:
            out.append(last)
    return out


def _minus(window: tuple[int, int], cut: tuple[int, int]) -> list[tuple[int, int]]:
    """window minus cut, as up to two ranges."""
    lo, hi = window
    if cut[0] == cut[1]:
        return [window]
    return [r for r in ((lo, max(lo, cut[0])), (min(hi, cut[1]), hi)) if r[0] < r[1]]


def plan_write(geom: Geometry, stripe: int, modified: tuple[tuple[int, int], ...],
               missing: int | None = None, logged: bool = False) -> WritePlan:
    """Plan one stripe update. `modified[i]` is the byte range of data chunk i
    being written; `missing` is a role that cannot be read or written; `logged`
    says the stripe may have an older log record that a full write must supersede."""
    p = geom.parity_role(stripe)
    mod_blocks = [(lo // BLOCK * BLOCK, -(-hi // BLOCK) * BLOCK) if lo < hi else (0, 0)
                  for lo, hi in modified]
    touched = [b for b in mod_blocks if b[0] < b[1]]
    if not touched:
        raise ValueError(f"stripe {stripe}: nothing to write")
    window = (min(b[0] for b in touched), max(b[1] for b in touched))
    role = [geom.data_role(stripe, i) for i in range(geom.data_chunks)]

    def plan(mode: WriteMode, reads: list[Extent], log: bool) -> WritePlan:
        return WritePlan(stripe, mode, p, window, tuple(modified),
                         tuple(e for e in reads if e.length), missing, log)

    edges = [Extent(role[i], a, b - a) for i, (lo, hi) in enumerate(modified) if lo < hi
             for a, b in _edges(lo, hi) if role[i] != missing]
    if missing == p:
        return plan(WriteMode.DATA_ONLY, edges, False)
    untouched = [Extent(role[i], a, b - a) for i in range(geom.data_chunks)
                 for a, b in _minus(window, mod_blocks[i])]
    missing_index = geom.data_index(stripe, missing) if missing is not None else None
    if missing_index is not None and mod_blocks[missing_index][0] < mod_blocks[missing_index][1]:
        everyone = [Extent(r, window[0], window[1] - window[0])
                    for r in range(geom.members) if r != missing]
        return plan(WriteMode.DEGRADED_WRITE, everyone, True)
    rmw = [Extent(role[i], a, b - a) for i, (a, b) in enumerate(mod_blocks) if a < b]
    rmw.append(Extent(p, window[0], window[1] - window[0]))
    rcw = untouched + edges
    rcw_possible = not any(e.role == missing for e in untouched)
    if rcw_possible and sum(e.length for e in rcw) <= sum(e.length for e in rmw):
        if not untouched:
            # edge blocks keep old bytes a crash must not lose: they are logged
            return plan(WriteMode.FULL_STRIPE, edges, logged or bool(edges))
        return plan(WriteMode.RECONSTRUCT_WRITE, rcw, True)
    return plan(WriteMode.READ_MODIFY_WRITE, rmw, True)


@dataclass(frozen=True)
class ReadPlan:
    """Read data chunk `index` bytes [lo, hi) (block aligned) of `stripe`:
    directly from `role`, or by XOR of the same range of every other role."""

    stripe: int
    index: int
    role: int
    lo: int
    hi: int
    reconstruct: bool

    def sources(self, geom: Geometry) -> list[int]:
        if not self.reconstruct:
            return [self.role]
        return [r for r in range(geom.members) if r != self.role]


def plan_read(geom: Geometry, stripe: int, index: int, lo: int, hi: int,
              missing: int | None = None) -> ReadPlan:
    role = geom.data_role(stripe, index)
    a, b = lo // BLOCK * BLOCK, -(-hi // BLOCK) * BLOCK
    return ReadPlan(stripe, index, role, a, b, role == missing)


def run_layout(geom: Geometry, first: int, count: int) -> list[list[int]]:
    """For whole stripes first..first+count-1 written or read as one run, what
    each role holds stripe by stripe: a data index, or -1 for parity. A role's
    chunks of consecutive stripes are contiguous on the member, so a run is one
    I/O per member."""
    return [[-1 if (i := geom.data_index(s, role)) is None else i
             for s in range(first, first + count)] for role in range(geom.members)]
