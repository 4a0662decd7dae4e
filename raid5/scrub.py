"""Scrub: read every block, check it against its checksum and parity, repair.

A block whose checksum fails is rebuilt from the rest of its row and
rewritten, and the report names its member. A row whose blocks all pass but
whose parity does not add up (possible only with unknown or colliding
checksums) counts as a mismatch and its parity is rewritten. The checkpoint
is the superblocks' scrub stripe, so a scrub cut by a crash resumes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .checksums import UNKNOWN, block_tags
from .engine import Array
from .errors import MemberLost
from .geometry import BLOCK
from .parity import xor_all
from .phases import Phase, PhaseEvent, PhaseKind
from .stripe import block_no, write_extents

log = logging.getLogger(__name__)


@dataclass
class ScrubReport:
    checked: int = 0              # blocks read and compared
    repaired: int = 0             # bad blocks rewritten from parity
    unrecoverable: int = 0        # bad blocks parity could not rebuild
    mismatches: int = 0           # rows whose parity did not add up
    by_member: Counter = field(default_factory=Counter)         # member name -> repaired
    bad: list[tuple[str, int, int]] = field(default_factory=list)  # (member, stripe, block row)

    def summary(self) -> str:
        members = ", ".join(f"{m}: {n}" for m, n in sorted(self.by_member.items())) or "none"
        return (f"checked {self.checked} blocks, repaired {self.repaired} ({members}), "
                f"unrecoverable {self.unrecoverable}, parity mismatches {self.mismatches}")


async def scrub_stripe(arr: Array, s: int, report: ScrubReport) -> None:
    geom = arr.geom
    gone = arr.missing(s)
    present = [r for r in range(geom.members) if r not in gone]
    rows = geom.blocks_per_chunk
    if len(gone) > 1:
        report.unrecoverable += rows * len(present)
        return
    base = geom.chunk_offset(s)
    first = block_no(arr, s, 0)
    chunks: dict[int, np.ndarray] = {}
    bad: dict[int, list[int]] = {}
    for r in present:
        raw = await arr.mread(r, base, geom.chunk_size)
        chunks[r] = np.frombuffer(raw, dtype=np.uint8).copy()
        stored = await arr.csums[r].get(first, rows)
        got = block_tags(raw)
        report.checked += rows
        unknown = [k for k in range(rows) if stored[k] == UNKNOWN]
        if unknown:
            await arr.csums[r].update(first, [got[k] if stored[k] == UNKNOWN else stored[k]
                                              for k in range(rows)])
        for k in range(rows):
            if stored[k] != UNKNOWN and stored[k] != got[k]:
                bad.setdefault(k, []).append(r)
    fixes: list[tuple[int, int, np.ndarray]] = []
    for k, roles in sorted(bad.items()):
        if len(roles) + len(gone) > 1:
            report.unrecoverable += len(roles)
            for r in roles:
                report.bad.append((arr.member_name(r), s, k))
            log.error("%s: stripe %d row %d: %s bad, cannot repair", arr.name, s, k,
                      ", ".join(arr.member_name(r) for r in roles))
            continue
        r = roles[0]
        sl = slice(k * BLOCK, (k + 1) * BLOCK)
        good = xor_all([chunks[o][sl] for o in present if o != r], BLOCK)
        (stored,) = await arr.csums[r].get(first + k, 1)
        if block_tags(good.tobytes())[0] != stored:
            report.unrecoverable += 1
            report.bad.append((arr.member_name(r), s, k))
            continue
        chunks[r][sl] = good
        fixes.append((r, k * BLOCK, good))
        report.repaired += 1
        report.by_member[arr.member_name(r)] += 1
        report.bad.append((arr.member_name(r), s, k))
        arr.stats.note_repair(arr.member_name(r))
        log.warning("%s: scrub repaired %s stripe %d row %d", arr.name, arr.member_name(r), s, k)
    if not gone:
        syndrome = xor_all(chunks.values(), geom.chunk_size).reshape(rows, BLOCK)
        off = np.flatnonzero(syndrome.any(axis=1))
        p = geom.parity_role(s)
        for k in off:
            if k in bad:
                continue
            report.mismatches += 1
            sl = slice(int(k) * BLOCK, (int(k) + 1) * BLOCK)
            fixed = chunks[p][sl] ^ syndrome[k]
            fixes.append((p, int(k) * BLOCK, fixed))
            log.warning("%s: stripe %d row %d parity mismatch, parity rewritten", arr.name, s, k)
    if fixes:
        await arr.make_durable(s, set(present) - {r for r, _, _ in fixes})
        await write_extents(arr, s, fixes, fua=False)


async def scrub(arr: Array, *, resume: bool = True, checkpoint_every: int = 64) -> ScrubReport:
    """Scrub the whole array (from the checkpoint when `resume`); returns the report."""
    start = arr.scrub_stripe if resume else 0
    report = ScrubReport()
    phase = Phase(PhaseKind.SCRUB, total=arr.geom.stripes, done=start)
    arr.phases[PhaseKind.SCRUB] = phase
    phase.fire(PhaseEvent.START, f"from stripe {start}")
    for s in range(start, arr.geom.stripes):
        while True:
            try:
                async with arr.locks.hold(s):
                    await scrub_stripe(arr, s, report)
                break
            except MemberLost:
                continue
        phase.done = s + 1
        if (s + 1) % checkpoint_every == 0:
            arr.scrub_stripe = s + 1
            await arr.write_superblocks(bump=False)
    arr.scrub_stripe = 0
    await arr.flush()
    await arr.write_superblocks(bump=False)
    phase.fire(PhaseEvent.FINISH, report.summary())
    arr.last_scrub = report
    return report
