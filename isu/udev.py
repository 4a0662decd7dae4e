"""Disks coming and going on an ISU, from kernel uevents (pyudev; no udevd needed).

`DiskWatcher` listens on the kernel's uevent netlink socket
(`Monitor.from_netlink(ctx, source="kernel")`) and turns block add/remove
of whole disks into `DiskEvent`s on its own thread. `DiskRoster` is the
ISU's rule on top of it: a new disk becomes an unassigned export
(`on_new_disk`), a member disk that disappears is reported failed at once
(`on_member_failed`).

Without udevd there are no ID_SERIAL/WWN properties, so disks are known by
their kernel name (sdb, loop4000). Uevents of one kernel reach every network
namespace, so lab ISUs sharing a machine must pass a `match` that picks
their own disks.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyudev

log = logging.getLogger(__name__)

NOT_DISKS = ("loop", "ram", "zram", "dm-", "sr", "fd", "nbd", "md")


def default_match(name: str) -> bool:
    """Whole disks an ISU on real hardware exports: not loop/ram/dm/optical/... devices."""
    return not name.startswith(NOT_DISKS)


@dataclass(frozen=True)
class DiskEvent:
    action: str                 # "add" or "remove"
    name: str                   # kernel name, e.g. "sdb", "loop4000"
    devnode: str                # "/dev/sdb"
    size_bytes: int | None      # from sysfs on add; None on remove
    seen_at: float              # time.monotonic() when the uevent was read


def _size(device: pyudev.Device) -> int | None:
    try:
        return int(device.attributes.asint("size")) * 512
    except (KeyError, ValueError, OSError):
        return None


class DiskWatcher:
    """Call `on_event(DiskEvent)` for each whole disk added or removed whose name `match`es.

    `on_event` runs on the watcher's thread; `start` returns once the
    netlink socket listens, so a disk added after `start` is never missed.
    """

    def __init__(self, on_event: Callable[[DiskEvent], None],
                 match: Callable[[str], bool] = default_match) -> None:
        self.on_event = on_event
        self.match = match
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self._monitor.filter_by("block")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-watcher", daemon=True)

    def __enter__(self) -> DiskWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._monitor.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            device = self._monitor.poll(timeout=0.2)
            if device is None:
                continue
            event = self.event_for(device)
            if event is not None:
                try:
                    self.on_event(event)
                except Exception:  # a callback bug must not stop disk events
                    log.exception("disk event %s %s: handler failed", event.action, event.name)

    def event_for(self, device: pyudev.Device) -> DiskEvent | None:
        """The DiskEvent for a uevent, or None when it is not a matching whole-disk add/remove."""
        if device.subsystem != "block" or device.device_type != "disk":
            return None
        if device.action not in ("add", "remove") or not self.match(device.sys_name):
            return None
        return DiskEvent(device.action, device.sys_name, device.device_node or f"/dev/{device.sys_name}",
                         _size(device) if device.action == "add" else None, time.monotonic())


class DiskRoster:
    """Which disks the ISU has, and what an add or remove means for each.

    `members` are the disks the head uses in its array. Callbacks run on the
    caller's (the watcher's) thread: `on_new_disk` for a disk to export as
    unassigned, `on_member_failed` for a member that vanished.
    """

    def __init__(self, members: Iterable[str], on_new_disk: Callable[[DiskEvent], None],
                 on_member_failed: Callable[[DiskEvent], None]) -> None:
        self.members = set(members)
        self.unassigned: set[str] = set()
        self.failed: set[str] = set()
        self.on_new_disk = on_new_disk
        self.on_member_failed = on_member_failed
        self._lock = threading.Lock()

    def assign(self, name: str) -> None:
        """The head adopted `name` as a member."""
        with self._lock:
            self.unassigned.discard(name)
            self.failed.discard(name)
            self.members.add(name)

    def handle(self, event: DiskEvent) -> None:
        with self._lock:
            if event.action == "add":
                if event.name in self.members:
                    log.warning("disk %s: member is back; the head decides whether to re-add it",
                                event.name)
                    return
                self.unassigned.add(event.name)
                notify: Callable[[DiskEvent], None] | None = self.on_new_disk
                log.info("disk %s: new, unassigned (%s bytes)", event.name, event.size_bytes)
            elif event.name in self.members:
                self.failed.add(event.name)
                notify = self.on_member_failed
                log.error("disk %s: member disk removed: failed", event.name)
            else:
                self.unassigned.discard(event.name)
                notify = None
                log.info("disk %s: unassigned disk removed", event.name)
        if notify is not None:
            notify(event)
