"""Long-running head operations (scrub, backup, restore) as jobs with
progress, so the API can answer at once and the CLI can show progress.

A job moves through named states: queued -> running -> done | failed.
Progress is a fraction 0..1 plus a human line; the result is a dict.
Jobs live in memory only: a head restart forgets them (the work itself keeps
its own checkpoints where it has any, e.g. raid5 scrub)."""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Job:
    id: int
    kind: str
    subject: str
    state: JobState = JobState.QUEUED
    progress: float = 0.0
    message: str = ""
    result: dict[str, Any] | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def report(self, fraction: float, message: str = "") -> None:
        self.progress = max(0.0, min(1.0, fraction))
        if message:
            self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "subject": self.subject, "state": self.state.value,
                "progress": round(self.progress, 4), "message": self.message, "result": self.result,
                "error": self.error, "started": self.started, "ended": self.ended}


class Jobs:
    """Runs jobs on the head's loop; one job per (kind, subject) at a time."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.jobs: dict[int, Job] = {}
        self._tasks: dict[int, asyncio.Task] = {}

    def start(self, kind: str, subject: str, work: Callable[[Job], Awaitable[dict[str, Any]]]) -> Job:
        for j in self.jobs.values():
            if j.kind == kind and j.subject == subject and j.state in (JobState.QUEUED, JobState.RUNNING):
                raise RuntimeError(f"a {kind} of {subject} is already running (job {j.id})")
        job = Job(next(self._ids), kind, subject)
        self.jobs[job.id] = job

        async def run() -> None:
            job.state = JobState.RUNNING
            try:
                job.result = await work(job)
                job.progress = 1.0
                job.state = JobState.DONE
            except asyncio.CancelledError:
                job.state, job.error = JobState.FAILED, "cancelled"
                raise
            except Exception as exc:  # reported to the admin through the job
                log.error("%s of %s failed: %s", kind, subject, exc)
                job.state, job.error = JobState.FAILED, str(exc) or exc.__class__.__name__
            finally:
                job.ended = time.time()

        self._tasks[job.id] = asyncio.ensure_future(run())
        return job

    async def wait(self, job_id: int) -> Job:
        task = self._tasks.get(job_id)
        if task:
            await asyncio.gather(task, return_exceptions=True)
        return self.jobs[job_id]

    async def cancel_all(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
