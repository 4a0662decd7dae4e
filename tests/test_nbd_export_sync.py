"""A FLUSH (or FUA write) on a file export does not stall the worker it runs
on (issue 9, 2.7): while its fdatasync waits for the disk, a READ on another
connection served by the same worker thread is answered, and the FLUSH still
answers only after its fdatasync returned.

In-process NBD server with one worker thread (so both connections share its
event loop) and our client; os.fdatasync is replaced by one that blocks on an
event the test sets once the READ is back (bounded, so a regression fails
instead of hanging).
"""
from __future__ import annotations

import asyncio
import os
import threading

import pytest

from opie.nbd.client import NBDClient
from opie.nbd.export import FileExport
from opie.nbd.server import NBDServer

MiB = 1 << 20
STALL_LIMIT = 5.0   # bound of every wait; a stalled READ waits this long, then the test fails


@pytest.mark.parametrize("sync_by", ["flush", "fua-write"])
def test_slow_fdatasync_does_not_stall_a_read_on_the_same_worker(tmp_path, monkeypatch, sync_by):
    path = tmp_path / "f.img"
    path.write_bytes(os.urandom(4 * MiB))
    want = path.read_bytes()[MiB:MiB + 4096]
    export = FileExport(str(path), "f")
    entered, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        if fd == export.fd:
            entered.set()
            release.wait(STALL_LIMIT)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)

    async def main():
        server = NBDServer({"f": export}, workers=1)
        _, port = await server.start("127.0.0.1", 0)
        clients = []
        try:
            a = await NBDClient.connect("127.0.0.1", port, "f", timeout=30)
            clients.append(a)
            b = await NBDClient.connect("127.0.0.1", port, "f", timeout=30)
            clients.append(b)
            await a.write(0, b"x" * 4096)
            syncing = asyncio.ensure_future(a.flush() if sync_by == "flush"
                                            else a.write(4096, b"y" * 4096, fua=True))
            assert await asyncio.to_thread(entered.wait, STALL_LIMIT), "fdatasync never started"
            read = asyncio.ensure_future(b.read(MiB, 4096))
            done, _ = await asyncio.wait({read}, timeout=STALL_LIMIT)
            answered_during_sync = read in done and not syncing.done()
            release.set()
            await syncing
            assert await read == want
            assert answered_during_sync, "the READ waited for the other connection's fdatasync"
        finally:
            release.set()
            for c in clients:
                await c.close()
            await server.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        export.close()
    assert path.read_bytes()[:4096] == b"x" * 4096
