"""Fencing the member ISUs at a new epoch: the new active's step after the election.

`fence_all(isus, epoch, tls)` asks every member ISU's control channel to
fence at `epoch` (isu.control.fence; the ISU refuses connections of older
epochs, closes them, ends their requests, makes the epoch durable, then
acknowledges). The calls run concurrently, at most `parallel` at once, each
bounded by `timeout`, so the whole takes at most about
ceil(n / parallel) * timeout. It never raises for an ISU that refuses or does
not answer: the result says which acknowledged and why the others did not.

Contract for the caller (DESIGN.md, "Two heads"): write nothing before
`result.quorum(n)` (N-1 of the N members acknowledged; any two such sets
intersect, so the old head can never complete a write again). A member that
did not acknowledge is failed for this epoch and resynced before it rejoins
(its ISU must be fenced at this epoch before it admits the new head's
connections: isu.fencing admits a writer only at the epoch it accepted).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

from opie.isu import control
from opie.isu.errors import ControlError
from opie.nbd import uri as nbd_uri
from opie.netaddr import parse_host_port

log = logging.getLogger(__name__)

PARALLEL = 16


@dataclass(frozen=True)
class FenceResult:
    """Which ISUs (as given) acknowledged the fence at `epoch`, and why the others did not."""

    epoch: int
    acked: tuple[str, ...]
    failed: dict[str, str] = field(default_factory=dict)

    def quorum(self, members: int) -> bool:
        """True when at least `members` - 1 acknowledged (the new active may write)."""
        return len(self.acked) >= members - 1


def member_isus(member_uris: Iterable[str]) -> list[str]:
    """The distinct ISU hosts behind member NBD URIs, in order (one fence per ISU,
    however many of its exports are members)."""
    hosts: list[str] = []
    for u in member_uris:
        host = nbd_uri.parse(u).host
        if host not in hosts:
            hosts.append(host)
    return hosts


def _control_address(isu: str, port: int) -> tuple[str, int]:
    """"HOST" (the control channel on `port`) or "HOST:PORT"."""
    if isu.count(":") == 1 or isu.startswith("["):
        return parse_host_port(isu)
    return isu, port


async def fence_all(isus: Iterable[str], epoch: int, tls: ssl.SSLContext | None, *,
                    port: int = control.CONTROL_PORT, timeout: float = control.FENCE_TIMEOUT,
                    parallel: int = PARALLEL) -> FenceResult:
    """Fence every ISU in `isus` ("HOST" or "HOST:PORT" of its control channel,
    duplicates once) at `epoch` with the head's client TLS context; see the module docstring."""
    targets = list(dict.fromkeys(isus))
    limit = asyncio.Semaphore(max(1, parallel))

    async def one(isu: str) -> str | None:
        async with limit:
            try:
                host, p = _control_address(isu, port)
                closed = await asyncio.wait_for(control.fence(host, epoch, tls, port=p, timeout=timeout),
                                                timeout)
            except (ControlError, ValueError) as exc:
                return str(exc)
            except asyncio.TimeoutError:
                return f"ISU {isu}: no acknowledgement of the fence within {timeout:.1f} s"
            log.info("ISU %s fenced at epoch %d (%d older connection(s) closed)", isu, epoch, closed)
            return None

    errors = await asyncio.gather(*(one(i) for i in targets))
    result = FenceResult(epoch, tuple(i for i, e in zip(targets, errors) if e is None),
                         {i: e for i, e in zip(targets, errors) if e is not None})
    for isu, why in result.failed.items():
        log.error("fence at epoch %d: %s", epoch, why)
    return result
