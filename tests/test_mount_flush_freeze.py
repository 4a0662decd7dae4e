"""The durability contract of head/mount.py, measured, and fsfreeze around it.

The finding (see head/mount.py's docstring): fsync/sync on the mounted ext4
reaches the NBD server as FLUSH — ext4's journal commit (PREFLUSH/FUA) makes
the loop device fsync the FUSE file, and nbdfuse turns that into nbd_flush.

Two ways to see it against real nbdkit:
- the log filter counts FLUSH requests before and after fsync/sync/freeze;
- the cache filter in writeback mode keeps writes in nbdkit's memory until a
  FLUSH; SIGKILLing nbdkit then loses exactly the unflushed writes, so data
  that survives the kill was flushed. A control shows that the rig does lose
  unflushed writes (so the test can fail).
"""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import threading
import time

import pytest
from proc_support import stop
from test_mount_lifecycle import assert_torn_down, blank_image, e2fsck_clean, rig, sha, write_files  # noqa: F401

from opie.head.fsfreeze import FreezeExpired
from opie.head.mount import State

FLUSH_DONE = re.compile(r"\.\.\.Flush id=\d+ return=0")


def flushes(logfile: str) -> int:
    with open(logfile) as f:
        return len(FLUSH_DONE.findall(f.read()))


WRITE_REQ = re.compile(r"connection=(\d+) Write id=(\d+) offset=0x([0-9a-f]+) count=0x([0-9a-f]+)")
WRITE_DONE = re.compile(r"connection=(\d+) \.\.\.Write id=(\d+) return=0")


def extents(path: str) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of `path` on the block device (filefrag, 4 KiB blocks)."""
    out = subprocess.run(["filefrag", "-v", "-b4096", path], capture_output=True, text=True, check=True).stdout
    ranges = [(int(a) * 4096, (int(b) + 1) * 4096)
              for a, b in re.findall(r"^\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+)\.\.\s*(\d+):", out, re.M)]
    assert ranges and all(a > 0 for a, _ in ranges), out
    return ranges


def flushed_after_writes(logfile: str, ranges: list[tuple[int, int]]) -> bool:
    """Every WRITE the server acknowledged that touches `ranges` was followed by an
    acknowledged FLUSH, and at least one such WRITE exists."""
    with open(logfile) as f:
        lines = f.read().splitlines()
    pending: dict[tuple[str, str], tuple[int, int]] = {}
    last_write = last_flush = -1
    for i, line in enumerate(lines):
        if (m := WRITE_REQ.search(line)):
            pending[(m[1], m[2])] = (int(m[3], 16), int(m[3], 16) + int(m[4], 16))
        elif (m := WRITE_DONE.search(line)):
            a, b = pending.pop((m[1], m[2]))
            if any(a < e and s < b for s, e in ranges):
                last_write = i
        elif FLUSH_DONE.search(line):
            last_flush = i
    return 0 <= last_write < last_flush


def wait_for(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_fsync_and_sync_send_nbd_flush(rig, tmp_path):
    """When fsync (or sync) returns, every WRITE carrying the file's blocks (found with
    filefrag) has been acknowledged and followed by an acknowledged FLUSH."""
    log = str(tmp_path / "nbdkit.log")
    _, uri = rig.nbdkit(["--filter=log", "memory", "256M", f"logfile={log}"])
    m = rig.mount(uri)
    m.up()
    path = os.path.join(m.mountpoint, "data")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        before = flushes(log)
        os.fsync(f.fileno())
        assert flushes(log) > before
        assert flushed_after_writes(log, extents(path))
    more = os.path.join(m.mountpoint, "more")
    with open(more, "wb") as f:
        f.write(os.urandom(1 << 20))
    before = flushes(log)
    subprocess.run(["sync"], check=True, timeout=30)
    assert flushes(log) > before
    assert flushed_after_writes(log, extents(more))


def _fuse_write_then_kill(rig, tmp_path, *, fsync: bool) -> bytes:
    """Write 4 KiB through a bare nbdfuse file to nbdkit (file + writeback cache),
    fsync it or not, SIGKILL nbdkit with the file still open; return what the image holds."""
    image = blank_image(tmp_path, 1 << 20, name=f"ctl-{fsync}.img")
    proc, uri = rig.nbdkit(["--filter=cache", "file", f"file={image}", "cache=writeback"])
    mnt = tmp_path / f"fuse-{fsync}"
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", str(mnt / "disk"), uri], stdin=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (mnt / "disk").exists()), "nbdfuse did not come up"
        fd = os.open(mnt / "disk", os.O_RDWR)
        os.pwrite(fd, b"\xa5" * 4096, 0)
        if fsync:
            os.fsync(fd)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        try:
            os.close(fd)
        except OSError:
            pass
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        stop(fuse)
    with open(image, "rb") as f:
        return f.read(4096)


def test_rig_loses_unflushed_writes_and_keeps_flushed_ones(rig, tmp_path):
    """Control for the next test: without a FLUSH the write is gone after the kill."""
    assert _fuse_write_then_kill(rig, tmp_path, fsync=False) == b"\0" * 4096
    assert _fuse_write_then_kill(rig, tmp_path, fsync=True) == b"\xa5" * 4096


def test_fsynced_files_survive_a_server_kill(rig, tmp_path):
    """ext4 -> loop -> nbdfuse -> nbdkit (writeback cache): files fsync'd before a SIGKILL
    of the server are all there after a restart; the filesystem is consistent."""
    image = blank_image(tmp_path, 256 << 20)
    log = str(tmp_path / "nbdkit.log")
    proc, uri = rig.nbdkit(["--filter=log", "--filter=cache", "file", f"file={image}",
                            "cache=writeback", f"logfile={log}"])
    m = rig.mount(uri)
    m.up()
    assert m.made_filesystem
    files = write_files(m.mountpoint, n=4)        # each fsync'd
    os.sync()                                     # directory entries too (ext4 fsync of a new file covers them)
    assert flushes(log) > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    m.down()
    assert_torn_down(rig, m)

    _, uri2 = rig.nbdkit(["file", f"file={image}"])
    m2 = rig.mount(uri2, name="again")
    m2.up()
    assert not m2.made_filesystem
    found = {os.path.join(m.mountpoint, os.path.basename(p)): sha(os.path.join(m2.mountpoint, os.path.basename(p)))
             for p in files}
    assert found == files
    m2.down()
    e2fsck_clean(image)


def test_freeze_blocks_writers_until_thaw(rig, tmp_path):
    log = str(tmp_path / "nbdkit.log")
    _, uri = rig.nbdkit(["--filter=log", "memory", "256M", f"logfile={log}"])
    m = rig.mount(uri)
    m.up()
    with open(os.path.join(m.mountpoint, "dirty"), "wb") as f:
        f.write(os.urandom(1 << 20))
    done = threading.Event()

    def writer() -> None:
        with open(os.path.join(m.mountpoint, "during"), "wb") as f:
            f.write(b"w" * 65536)
            os.fsync(f.fileno())
        done.set()

    t = threading.Thread(target=writer, daemon=True)
    before = flushes(log)
    with m.freeze(timeout=10, max_frozen=20):
        assert m.state is State.FROZEN
        assert flushes(log) > before              # freezing flushed everything to the export:
        assert flushed_after_writes(log, [(0, 1 << 40)])   # no WRITE after the last FLUSH
        t.start()
        assert not done.wait(0.7), "a write went through a frozen filesystem"
    assert m.state is State.MOUNTED
    assert done.wait(10), "the writer stayed blocked after thaw"
    t.join(5)


def test_freeze_watchdog_thaws_a_stuck_holder(rig):
    _, uri = rig.nbdkit(["memory", "128M"])
    m = rig.mount(uri)
    m.up()
    done = threading.Event()

    def writer() -> None:
        with open(os.path.join(m.mountpoint, "w"), "wb") as f:
            f.write(b"x")
        done.set()

    with pytest.raises(FreezeExpired) as e:
        with m.freeze(timeout=10, max_frozen=0.5):
            threading.Thread(target=writer, daemon=True).start()
            assert done.wait(5), "the watchdog did not thaw"
    assert e.value.errno == errno.ETIMEDOUT
    assert m.state is State.MOUNTED
    with open(os.path.join(m.mountpoint, "after"), "wb") as f:   # not frozen any more
        f.write(b"y")
