"""The failover timeline: each takeover step with how long it took (issue 10).

The HA service times every step of a takeover into one `Timeline` and
publishes it (`to_json`) in etcd at /opie/CLUSTER/failover; the last one is
kept in memory for `GET /v1/ha` and `opie ha status`. A step that raises is
recorded with its error, then the error goes on.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Timeline:
    """One takeover by head `head` at `epoch`, begun at wall time `at`."""

    head: str
    epoch: int
    at: float = field(default_factory=time.time)
    steps: list[dict[str, Any]] = field(default_factory=list)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Time the block as step `name`; what the block puts in the yielded dict is recorded with it."""
        detail: dict[str, Any] = {}
        began = self.clock()
        try:
            yield detail
        except BaseException as exc:
            detail["error"] = str(exc) or type(exc).__name__
            raise
        finally:
            self.steps.append({"step": name, "seconds": round(self.clock() - began, 4), **detail})

    @property
    def seconds(self) -> float:
        return round(sum(s["seconds"] for s in self.steps), 4)

    def to_json(self) -> dict[str, Any]:
        return {"head": self.head, "epoch": self.epoch, "at": self.at, "seconds": self.seconds,
                "steps": list(self.steps)}
