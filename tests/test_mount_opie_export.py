"""A volume of head/volumes served by Opie's own NBD server (nbd/server.py), mounted
by head/mount.py: over the server's Unix socket (how the head mounts its own
volumes) and over TCP; then a snapshot of it, taken frozen, mounted read-only.

The server runs on an asyncio loop in a thread of the test process and is
closed in the fixture finalizer; mounts are torn down by the `rig` fixture.
"""
from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest
from test_mount_lifecycle import assert_torn_down, rig, sha, write_files  # noqa: F401

from opie.head.mount import State
from opie.head.volumes import MemoryDevice, Pool
from opie.nbd.server import NBDServer

MIB = 1 << 20


class ServedPool:
    """A pool on a MemoryDevice with one volume, served on a loop in a thread."""

    def __init__(self, sock: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-server", daemon=True)
        self.thread.start()
        self.sock = sock
        self.server: NBDServer | None = None
        self.port = self.call(self._start())

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> int:
        self.pool = await Pool.format(MemoryDevice(192 * MIB), segment_size=1 * MIB)
        await self.pool.create_volume("vol", 128 * MIB)
        self.server = NBDServer({"vol": self.pool.open_volume("vol")})
        _, port = await self.server.start("127.0.0.1", 0)
        await self.server.start_unix(self.sock)
        return port

    async def _snapshot(self, name: str) -> None:
        await self.pool.create_snapshot("vol", name)
        self.server.exports[f"vol@{name}"] = self.pool.open_snapshot("vol", name)

    def snapshot(self, name: str) -> None:
        """Snapshot the volume and export it as vol@NAME (new connections see it)."""
        self.call(self._snapshot(name))

    def close(self) -> None:
        if self.server is not None:
            self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served(tmp_path):
    s = ServedPool(str(tmp_path / "nbd.sock"))
    yield s
    s.close()


def test_volume_over_unix_socket_and_tcp_then_frozen_snapshot_read_only(rig, served):
    m = rig.mount(f"nbd+unix:///vol?socket={served.sock}", expected_size=128 * MIB)
    m.up()
    assert m.made_filesystem
    files = write_files(m.mountpoint, n=3)
    with m.freeze(timeout=10, max_frozen=30):        # the head's snapshot sequence
        served.snapshot("before")
    m.down()
    m.up()
    assert not m.made_filesystem
    assert {p: sha(p) for p in files} == files
    for p in files:                                   # overwrite after the snapshot
        with open(p, "wb") as f:
            f.write(b"new")
    os.sync()
    snap = rig.mount(f"nbd://127.0.0.1:{served.port}/vol@before", name="snap", read_only=True)
    snap.up()
    assert snap.state is State.MOUNTED
    old = {p: sha(os.path.join(snap.mountpoint, os.path.basename(p))) for p in files}
    assert list(old.values()) == list(files.values())  # the snapshot holds the old contents
    with pytest.raises(OSError) as e:
        open(os.path.join(snap.mountpoint, "x"), "wb")
    assert e.value.errno == errno.EROFS
    snap.down()
    m.down()
    assert_torn_down(rig, m)
    assert_torn_down(rig, snap)
    assert served.pool.check().problems == []
