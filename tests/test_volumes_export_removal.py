"""Deleting a volume or a snapshot ends the NBD sessions open on its export
(issue 9, 2.3b).

The head's own delete calls (`Head.delete_volume`, `Head.delete_snapshot`)
run against its real NBD server, with real NBD clients connected to the
exports. After a delete the server has closed those connections (the client
sees the connection lost, not an error reply from a session still serving a
deleted device), a request in flight never returns bytes another volume
wrote into the freed space, and sessions on other exports go on.
"""

from __future__ import annotations

import asyncio
import errno

from test_volumes_races import PausingDevice, outcome, show

from opie.head.config import HeadConfig
from opie.head.daemon import Head
from opie.head.volumes import Pool
from opie.nbd.client import NBDClient
from opie.nbd.export import FileExport
from opie.nbd.server import NBDServer

SEG = 16 * 1024
WAIT = 20.0
MINE, THEIRS = b"A" * (4 * SEG), b"B" * (4 * SEG)


async def head_with_exports(tmp_path) -> tuple[Head, PausingDevice]:
    """A head composed of a pool on a memory device and its NBD server on
    loopback: the parts the delete calls touch, without members or mounts."""
    head = Head(tmp_path / "head", HeadConfig(members=[], tls_dir=None,
                                              mount_root=str(tmp_path / "mnt")))
    dev = PausingDevice(2 << 20)
    head.pool = await Pool.format(dev, segment_size=SEG, max_entries=62)
    head.nbd = NBDServer({})
    head.nbd_addr = await head.nbd.start("127.0.0.1", 0)
    return head, dev


async def connect(head: Head, export: str) -> NBDClient:
    host, port = head.nbd_addr
    # no reconnects: a closed connection must show as such, not be re-opened
    return await NBDClient.connect(host, port, export, timeout=5.0, reconnect_attempts=0)


async def create_written_volume(head: Head, name: str, data: bytes) -> None:
    await head.create_volume(name, len(data))
    vol = head.pool.open_volume(name)
    await vol.write(0, data)
    await vol.flush()


def test_deleting_volume_and_snapshot_closes_their_sessions(tmp_path) -> None:
    async def body() -> None:
        head, dev = await head_with_exports(tmp_path)
        clients: list[NBDClient] = []
        try:
            await create_written_volume(head, "a", MINE)
            await head.create_snapshot("a", "s")
            vol, snap = await connect(head, "a"), await connect(head, "a@s")
            clients += [vol, snap]
            assert await vol.read(0, SEG) == MINE[:SEG]
            assert await snap.read(0, SEG) == MINE[:SEG]

            await head.delete_snapshot("a", "s")
            after = await outcome(asyncio.ensure_future(snap.read(0, SEG)))
            assert after == errno.ECONNRESET, f"the snapshot's session answered {show(after)}"
            assert await vol.read(SEG, SEG) == MINE[SEG:2 * SEG]     # other sessions go on

            dev.arm()
            in_flight = asyncio.ensure_future(vol.read(0, SEG))
            await dev.entered.wait()
            deleting = asyncio.ensure_future(head.delete_volume("a"))
            writing = asyncio.ensure_future(create_written_volume(head, "b", THEIRS))
            dev.release.set()
            await asyncio.gather(deleting, writing)
            got = await outcome(in_flight)
            assert got in (MINE[:SEG], errno.ECONNRESET), f"the read in flight returned {show(got)}"
            after = await outcome(asyncio.ensure_future(vol.read(0, SEG)))
            assert after == errno.ECONNRESET, f"the volume's session answered {show(after)}"
            other = await connect(head, "b")
            clients.append(other)
            assert await other.read(0, len(THEIRS)) == THEIRS
            assert head.pool.check().problems == []
        finally:
            for c in clients:
                await c.close()
            await head.nbd.close()
    asyncio.run(asyncio.wait_for(body(), WAIT))


def test_remove_export_ends_sessions_on_worker_loops(tmp_path) -> None:
    """The ISU serves its disks from worker threads: removal reaches the
    sessions running on their loops too, and only those on that export."""
    async def body() -> None:
        exports = {}
        for name in ("x", "y"):
            (tmp_path / name).write_bytes(name.encode() * SEG)
            exports[name] = FileExport(str(tmp_path / name), name)
        server = NBDServer(exports, workers=2)
        host, port = await server.start("127.0.0.1", 0)
        clients = [await NBDClient.connect(host, port, name, timeout=5.0, reconnect_attempts=0)
                   for name in ("x", "x", "y", "y")]
        try:
            await server.remove_export("x")
            for c in clients[:2]:
                after = await outcome(asyncio.ensure_future(c.read(0, 512)))
                assert after == errno.ECONNRESET, f"a session on x answered {show(after)}"
            for c in clients[2:]:
                assert await c.read(0, 512) == b"y" * 512
        finally:
            for c in clients:
                await c.close()
            await server.close()
            for e in exports.values():
                e.close()
    asyncio.run(asyncio.wait_for(body(), WAIT))
