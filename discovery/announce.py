"""An ISU announces itself as `_opie-isu._tcp.local.` (python-zeroconf).

The announcement carries the TXT of `discovery.record`; `update` re-sends it
at once (heads see a TXT change within milliseconds). Zeroconf binds only
the one IPv4 interface address it is given. `close` sends a goodbye; an ISU
that dies without one stays in caches ~19 minutes, which is why liveness
comes from `discovery.heartbeat`, not from here.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from typing import Any

from zeroconf import IPVersion, ServiceInfo, Zeroconf

from opie.discovery.lifecycle import Service
from opie.discovery.record import SERVICE_TYPE, IsuRecord

log = logging.getLogger(__name__)


def _service_info(record: IsuRecord) -> ServiceInfo:
    return ServiceInfo(SERVICE_TYPE, record.service_name, port=record.port,
                       properties=record.to_txt(), server=f"isu-{record.uuid}.local.",
                       addresses=[socket.inet_aton(record.address)])


class IsuAnnouncer(Service):
    """Announce `record` on the interface holding `record.address`.

    `start` returns once the service is registered (after mDNS probing,
    about 1 s). `update` and `close` may be called from any thread.
    """

    def __init__(self, record: IsuRecord) -> None:
        self.record = record
        self._lock = threading.Lock()
        self._zc: Zeroconf | None = None

    def start(self) -> None:
        self._zc = Zeroconf(interfaces=[self.record.address], ip_version=IPVersion.V4Only)
        self._zc.register_service(_service_info(self.record))
        log.info("isu %s: announced on %s (state %s)", self.record.uuid, self.record.address,
                 self.record.state)

    def update(self, **changes: Any) -> IsuRecord:
        """Change TXT fields (e.g. state="degraded") and announce the new TXT now."""
        with self._lock:
            new = dataclasses.replace(self.record, **changes)
            if new.uuid != self.record.uuid or new.address != self.record.address:
                raise ValueError("uuid and address cannot change while announcing; close and start again")
            if new != self.record and self._zc is not None:
                self._zc.update_service(_service_info(new))
                log.info("isu %s: announcement now %s", new.uuid,
                         {k: v for k, v in new.to_txt().items() if self.record.to_txt()[k] != v})
            self.record = new
            return new

    def close(self) -> None:
        """Say goodbye and release the sockets; safe to call twice."""
        with self._lock:
            if self._zc is not None:
                try:
                    self._zc.unregister_service(_service_info(self.record))
                finally:
                    self._zc.close()
                    self._zc = None
