"""Running a stripe update to its end even when its caller is cancelled.

A stripe update that has started writing must not stop half-way: data
written without its parity leaves the stripe inconsistent, and once the
update's task ends its partial-parity log record counts as done and a flush
retires it. Cancellation is real (a closing NBD session cancels its requests),
so the array runs each update through `run_to_end`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def run_to_end(update: Awaitable[T]) -> T:
    """Await `update` in its own task until it ends, whatever happens to the
    caller. If the caller is cancelled meanwhile, it still waits (holding its
    stripe locks) and raises CancelledError once the update has ended; the
    update's own error, if any, is then only logged."""
    task = asyncio.ensure_future(update)
    interrupted = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise                   # the update itself was cancelled
            interrupted = True
        except GeneratorExit:
            raise                       # the coroutine is being closed (its loop is gone)
        except BaseException as exc:
            if not interrupted:
                raise
            log.warning("stripe update ended with %r after its caller was cancelled", exc)
            break
    if interrupted:
        raise asyncio.CancelledError()
    return result
