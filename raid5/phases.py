"""Background phases (rebuild, resync, scrub) as explicit states.

Each phase is one `Phase` object: a kind, a state from `PhaseState`, moved
only by `PhaseEvent`s through `TRANSITIONS`, and progress in stripes. Where
the checkpoint lives on disk is the phase's business: rebuild keeps it as the
replacement's recovery stripe, resync as the write-intent bitmap, scrub as
the superblock's scrub stripe.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class PhaseKind(enum.Enum):
    REBUILD = "rebuild"   # a replacement member is written whole
    RESYNC = "resync"     # dirty regions (crash, or a member that was away) made consistent
    SCRUB = "scrub"       # every block read, checked, repaired


class PhaseState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"


class PhaseEvent(enum.Enum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    FINISH = "finish"
    FAIL = "fail"


TRANSITIONS: dict[tuple[PhaseState, PhaseEvent], PhaseState] = {
    (PhaseState.IDLE, PhaseEvent.START): PhaseState.RUNNING,
    (PhaseState.RUNNING, PhaseEvent.PAUSE): PhaseState.PAUSED,
    (PhaseState.PAUSED, PhaseEvent.RESUME): PhaseState.RUNNING,
    (PhaseState.RUNNING, PhaseEvent.FINISH): PhaseState.DONE,
    (PhaseState.RUNNING, PhaseEvent.FAIL): PhaseState.FAILED,
    (PhaseState.PAUSED, PhaseEvent.FAIL): PhaseState.FAILED,
}


class PhaseError(Exception):
    """An event that the phase's current state does not allow."""


@dataclass
class Phase:
    kind: PhaseKind
    total: int
    done: int = 0
    state: PhaseState = PhaseState.IDLE
    detail: str = ""
    history: list[PhaseState] = field(default_factory=list)

    def fire(self, event: PhaseEvent, detail: str = "") -> PhaseState:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise PhaseError(f"{self.kind.value}: {event.value} not allowed when {self.state.value}")
        log.info("%s: %s -> %s %s", self.kind.value, self.state.value, new.value, detail)
        self.history.append(self.state)
        self.state = new
        self.detail = detail
        return new

    @property
    def progress(self) -> float:
        return 1.0 if self.total == 0 else min(1.0, self.done / self.total)

    def describe(self) -> str:
        return f"{self.kind.value} {self.state.value} {self.progress * 100:.1f}% ({self.done}/{self.total})"
