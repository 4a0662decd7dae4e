"""An ISU's presence on the network: heartbeat responder plus zeroconf announcement.

`IsuPresence` starts both on the ISU's address, puts the responder's port
into the TXT (`hb`), and stops both together, so the head never sees an
announcement without a heartbeat behind it. This is what the ISU agent
runs once it has an address (from a lease or the serial console).
"""
from __future__ import annotations

import logging
import uuid as uuidlib
from typing import Any

from opie.discovery.announce import IsuAnnouncer
from opie.discovery.heartbeat import HeartbeatResponder
from opie.discovery.lifecycle import Service
from opie.discovery.record import IsuRecord

log = logging.getLogger(__name__)


class IsuPresence(Service):
    """Announce ISU `uuid` at `address` (agent port `port`) with TXT `fields`, and answer heartbeats.

    `fields` are the other IsuRecord fields (state, disks, capacity, version,
    config_gen, cluster, role, name). `start` returns once announced (~1 s).
    """

    def __init__(self, uuid: str, address: str, port: int, *, hb_port: int = 0, **fields: Any) -> None:
        self._responder = HeartbeatResponder(uuidlib.UUID(uuid), address, hb_port)
        self._announcer = IsuAnnouncer(IsuRecord(uuid, address, port, self._responder.port, **fields))

    @property
    def record(self) -> IsuRecord:
        return self._announcer.record

    def start(self) -> None:
        self._responder.start()
        try:
            self._announcer.start()
        except BaseException:
            self._responder.close()
            raise

    def update(self, **changes: Any) -> IsuRecord:
        """Change TXT fields and announce them at once (see IsuAnnouncer.update)."""
        return self._announcer.update(**changes)

    def close(self) -> None:
        """Goodbye first, then stop answering heartbeats."""
        try:
            self._announcer.close()
        finally:
            self._responder.close()
