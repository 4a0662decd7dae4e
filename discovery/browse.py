"""The head browses `_opie-isu._tcp.local.` and classifies what it finds.

`IsuBrowser` calls `on_event(DiscoveryEvent)` from zeroconf's browser
thread: FOUND when an ISU is first resolved, CHANGED when its TXT or address
changes, GONE when it says goodbye. A dead ISU does not produce GONE (caches
keep it ~19 minutes); `discovery.registry` adds heartbeat liveness.
Services whose TXT is not an ISU's are logged once and ignored.
"""
from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from opie.discovery.lifecycle import Service
from opie.discovery.record import SERVICE_TYPE, BadAnnouncement, IsuClass, IsuRecord, classify, from_txt

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000


class EventKind(enum.Enum):
    FOUND = "found"
    CHANGED = "changed"
    GONE = "gone"


@dataclass(frozen=True)
class DiscoveryEvent:
    kind: EventKind
    record: IsuRecord
    isu_class: IsuClass


class IsuBrowser(Service):
    """Browse on the interface with IPv4 `interface_address` for the head of `cluster_id`."""

    def __init__(self, interface_address: str, cluster_id: str,
                 on_event: Callable[[DiscoveryEvent], None]) -> None:
        self.interface_address = interface_address
        self.cluster_id = cluster_id
        self.on_event = on_event
        self._lock = threading.Lock()
        self._by_name: dict[str, IsuRecord] = {}
        self._rejected: set[str] = set()
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None

    def start(self) -> None:
        self._zc = Zeroconf(interfaces=[self.interface_address], ip_version=IPVersion.V4Only)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])

    def close(self) -> None:
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None
        if self._zc is not None:
            self._zc.close()
            self._zc = None

    def records(self) -> list[IsuRecord]:
        """Every ISU currently announced (dead ones included until their records expire)."""
        with self._lock:
            return list(self._by_name.values())

    def _resolve(self, zc: Zeroconf, name: str) -> IsuRecord | None:
        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.load_from_cache(zc) and not info.request(zc, RESOLVE_TIMEOUT_MS):
            log.warning("could not resolve %s", name)
            return None
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or info.port is None:
            log.warning("%s: announced without an IPv4 address or port", name)
            return None
        try:
            return from_txt(info.properties, addresses[0], info.port)
        except BadAnnouncement as exc:
            if name not in self._rejected:
                self._rejected.add(name)
                log.warning("%s: ignored: %s", name, exc)
            return None

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                record = self._by_name.pop(name, None)
            if record is not None:
                self.on_event(DiscoveryEvent(EventKind.GONE, record, classify(record, self.cluster_id)))
            return
        record = self._resolve(zeroconf, name)
        if record is None:
            return
        with self._lock:
            old = self._by_name.get(name)
            self._by_name[name] = record
        if old == record:
            return
        kind = EventKind.FOUND if old is None else EventKind.CHANGED
        self.on_event(DiscoveryEvent(kind, record, classify(record, self.cluster_id)))
