"""The head's view of the ISUs: zeroconf discovery plus heartbeat liveness.

`IsuRegistry` watches every ISU it discovers and reports one stream of
`RegistryEvent`s to `on_event` (called from zeroconf's or the heartbeat's
thread; hand off with `loop.call_soon_threadsafe` in asyncio code):

    found    resolved for the first time (with its class: new/member/spare/foreign)
    changed  TXT or address changed (e.g. state ready -> degraded)
    dead     no heartbeat for `timeout` s although still announced
    alive    heartbeats again after dead
    gone     said goodbye (clean shutdown)

Foreign ISUs are listed but never pinged: they belong to another cluster.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from opie.discovery.browse import DiscoveryEvent, EventKind, IsuBrowser
from opie.discovery.heartbeat import LivenessMonitor
from opie.discovery.lifecycle import Service
from opie.discovery.record import IsuClass, IsuRecord, classify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryEvent:
    kind: str                     # found, changed, dead, alive, gone
    uuid: str
    record: IsuRecord
    isu_class: IsuClass
    at: float                     # time.time() when the head noticed


@dataclass(frozen=True)
class IsuView:
    record: IsuRecord
    isu_class: IsuClass
    alive: bool


class IsuRegistry(Service):
    """Discover and watch ISUs from the head at `interface_address` for `cluster_id`."""

    def __init__(self, interface_address: str, cluster_id: str,
                 on_event: Callable[[RegistryEvent], None],
                 interval: float = 0.25, timeout: float = 1.5) -> None:
        self.cluster_id = cluster_id
        self.on_event = on_event
        self._lock = threading.Lock()
        self._records: dict[str, IsuRecord] = {}
        self._alive: dict[str, bool] = {}
        self._browser = IsuBrowser(interface_address, cluster_id, self._on_discovery)
        self._liveness = LivenessMonitor(self._on_dead, self._on_alive, bind_address=interface_address,
                                         interval=interval, timeout=timeout)

    def start(self) -> None:
        self._liveness.start()
        self._browser.start()

    def close(self) -> None:
        self._browser.close()
        self._liveness.close()

    def isus(self) -> dict[str, IsuView]:
        """Every ISU currently known, by UUID."""
        with self._lock:
            return {u: IsuView(r, classify(r, self.cluster_id), self._alive.get(u, True))
                    for u, r in self._records.items()}

    def _emit(self, kind: str, record: IsuRecord) -> None:
        self.on_event(RegistryEvent(kind, record.uuid, record, classify(record, self.cluster_id),
                                    time.time()))

    def _on_discovery(self, event: DiscoveryEvent) -> None:
        record = event.record
        with self._lock:
            if event.kind is EventKind.GONE:
                self._records.pop(record.uuid, None)
                self._alive.pop(record.uuid, None)
            else:
                self._records[record.uuid] = record
                self._alive.setdefault(record.uuid, True)
        if event.kind is EventKind.GONE or event.isu_class is IsuClass.FOREIGN:
            self._liveness.forget(record.uuid)
        else:
            self._liveness.watch(record.uuid, (record.address, record.hb_port))
        if event.kind is not EventKind.CHANGED:
            log.info("isu %s (%s) %s at %s", record.uuid, event.isu_class.value,
                     event.kind.value, record.address)
        self._emit(event.kind.value, record)

    def _on_liveness(self, uuid: str, alive: bool) -> None:
        with self._lock:
            record = self._records.get(uuid)
            if record is None:
                return
            self._alive[uuid] = alive
        self._emit("alive" if alive else "dead", record)

    def _on_dead(self, uuid: str, silent_for: float) -> None:
        self._on_liveness(uuid, False)

    def _on_alive(self, uuid: str) -> None:
        self._on_liveness(uuid, True)
