"""What the pool knows about its volumes and snapshots in memory, and the
read-only views of them it hands to callers (API, CLI, backups)."""

from __future__ import annotations

from dataclasses import dataclass, field

from opie.head.volumes.locking import SegmentLocks, WriteGate


@dataclass
class SnapshotState:
    slot: int          # catalog slot
    id: int
    name: str
    epoch: int         # the source volume's epoch it froze
    size: int
    created: float
    deleted: bool = False


@dataclass
class VolumeState:
    slot: int
    id: int
    name: str
    size: int
    created: float
    snapshots: dict[str, SnapshotState] = field(default_factory=dict)
    gate: WriteGate = field(default_factory=WriteGate)
    locks: SegmentLocks = field(default_factory=SegmentLocks)
    deleted: bool = False


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    size: int             # bytes the volume presents
    created: float        # unix time
    mapped_bytes: int     # bytes of segments the volume has written (thin usage)
    snapshots: int


@dataclass(frozen=True)
class SnapshotInfo:
    volume: str           # the source volume
    name: str
    created: float
    size: int             # bytes, the source's size when taken
    exclusive_bytes: int  # space only this snapshot holds: what deleting it frees


@dataclass(frozen=True)
class PoolSpace:
    segment_size: int
    total_bytes: int
    used_bytes: int         # held by volumes and snapshots
    free_bytes: int         # placeable now
    pending_bytes: int      # freed, placeable after the next commit
    provisioned_bytes: int  # sum of volume sizes (may exceed total: thin)


@dataclass(frozen=True)
class CheckReport:
    segments: int
    free: int
    owned: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems
