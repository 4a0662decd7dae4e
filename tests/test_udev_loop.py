"""Disks from kernel uevents: a loop device added and removed with LOOP_CTL_ADD /
LOOP_CTL_REMOVE is first a new unassigned disk, then (once adopted as a member)
a failed one. Uses a fixed high loop number so no real loop device is touched."""
from __future__ import annotations

import errno
import fcntl
import os
import queue
import time
from collections.abc import Iterator

import pytest

from opie.isu.udev import DiskEvent, DiskRoster, DiskWatcher, default_match

LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
LOOP_NR = 4213
NAME = f"loop{LOOP_NR}"


def loop_ctl(request: int) -> None:
    fd = os.open("/dev/loop-control", os.O_RDWR)
    try:
        fcntl.ioctl(fd, request, LOOP_NR)
    finally:
        os.close(fd)


@pytest.fixture
def loop_slot() -> Iterator[None]:
    """Make sure loop4213 does not exist before and after the test."""
    def remove() -> None:
        try:
            loop_ctl(LOOP_CTL_REMOVE)
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise
    remove()
    yield
    remove()


def test_added_disk_is_unassigned_then_fails_as_a_member(loop_slot: None) -> None:
    new: queue.Queue[DiskEvent] = queue.Queue()
    failed: queue.Queue[DiskEvent] = queue.Queue()
    roster = DiskRoster([], on_new_disk=new.put, on_member_failed=failed.put)
    with DiskWatcher(roster.handle, match=lambda name: name == NAME):
        t0 = time.monotonic()
        loop_ctl(LOOP_CTL_ADD)
        added = new.get(timeout=5)
        assert (added.action, added.name, added.devnode, added.size_bytes) == ("add", NAME, f"/dev/{NAME}", 0)
        assert roster.unassigned == {NAME}
        print(f"disk add seen after {added.seen_at - t0:.4f} s")
        roster.assign(NAME)                    # the head adopts it as a member
        t1 = time.monotonic()
        loop_ctl(LOOP_CTL_REMOVE)
        gone = failed.get(timeout=5)
        assert (gone.action, gone.name) == ("remove", NAME)
        assert roster.failed == {NAME}
        print(f"member disk removal reported failed after {gone.seen_at - t1:.4f} s")
    assert new.empty() and failed.empty()


def test_removing_an_unassigned_disk_reports_no_failure(loop_slot: None) -> None:
    seen: list[DiskEvent] = []
    failures: list[DiskEvent] = []
    roster = DiskRoster(["sdz"], on_new_disk=seen.append, on_member_failed=failures.append)
    with DiskWatcher(roster.handle, match=lambda name: name == NAME):
        loop_ctl(LOOP_CTL_ADD)
        loop_ctl(LOOP_CTL_REMOVE)
        deadline = time.monotonic() + 5
        while NAME not in {e.name for e in seen} or roster.unassigned:
            assert time.monotonic() < deadline, (seen, roster.unassigned)
            time.sleep(0.02)
    assert failures == [] and roster.failed == set()


def test_default_match_skips_virtual_devices() -> None:
    assert default_match("sdb") and default_match("nvme0n1") and default_match("vdc")
    assert not any(default_match(n) for n in ("loop0", "ram1", "zram0", "dm-3", "sr0", "nbd2"))
