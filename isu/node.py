"""One ISU as a process: the agent (isu.agent) composed with its cluster
services (isu.services), run until SIGTERM or SIGINT.

When ready it prints one JSON line on stdout, `{"event": "ready", "uuid":
..., "listen": "HOST:PORT", "exports": [...], ...}`, so a supervisor (the
lab, a test) learns the real port even with port 0; on a clean stop, after
the disks are synced, `{"event": "stopped", "uuid": ...}`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from opie.isu.agent import ISUAgent
from opie.isu.fencing import EpochVerifier
from opie.isu.services import IsuServices, ServiceOptions

log = logging.getLogger(__name__)


async def run(agent: ISUAgent) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly (services first, then NBD, disks synced)."""
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "ready", **agent.status()}), flush=True)
    await stop.wait()
    await agent.stop()


def serve(state_dir: str, disk_specs: list[str], listen: str, tls_dir: str | None,
          workers: int | None = None, services: ServiceOptions | None = None, insecure: bool = False,
          epoch_verifier: EpochVerifier | None = None) -> int:
    """Build the agent (and its services when any is wanted) and run it; blocks until stopped.
    `insecure`: allow plain listeners on network addresses (see nbd.tls.vet_plain_listener).
    `epoch_verifier`: asked before each fence (isu.fencing.EpochGate)."""
    agent = ISUAgent(state_dir, disk_specs, listen, tls_dir, workers, insecure=insecure,
                     epoch_verifier=epoch_verifier)
    try:
        if services is not None and services.wanted:
            agent.services = IsuServices(agent, services)
        asyncio.run(run(agent))
    finally:
        agent.close_disks()
    print(json.dumps({"event": "stopped", "uuid": agent.uuid}), flush=True, file=sys.stdout)
    return 0
