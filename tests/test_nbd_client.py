"""The head's NBD client against real servers (nbdkit and our ISU):
pipelining, out-of-order completion, errors with errno, TLS, timeouts and
reconnect after an ISU restart."""
from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import signal

import pytest

from opie.nbd import tls
from opie.nbd.client import NBDClient, list_exports
from opie.nbd.errors import ExportChanged
from proc_support import freeze

MiB = 1 << 20


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@pytest.mark.parametrize("server", ["nbdkit", "isu"])
def test_pipelined_random_io_matches_reference(tmp_path, server, isu_factory, nbdkit_factory):
    size = 16 * MiB
    img = tmp_path / "d.img"
    if server == "nbdkit":
        with open(img, "wb") as f:
            f.truncate(size)
        port = nbdkit_factory(str(img))
        export = ""
    else:
        port = isu_factory([f"{img}:16M"]).port
        export = "d"
    ref = bytearray(size)
    rnd = random.Random(42)

    async def main():
        c = await NBDClient.connect("127.0.0.1", port, export)
        assert c.size == size and c.can_flush and c.can_fua
        # 200 non-overlapping writes in flight at once
        slots = list(range(0, size, 64 * 1024))
        rnd.shuffle(slots)
        writes = []
        for off in slots[:200]:
            n = rnd.randrange(1, 64 * 1024)
            data = rnd.randbytes(n)
            ref[off:off + n] = data
            writes.append(c.write(off, data, fua=rnd.random() < 0.1))
        await asyncio.gather(*writes)
        await c.flush()
        reads = [(off, rnd.randrange(1, 256 * 1024)) for off in (rnd.randrange(0, size - 256 * 1024) for _ in range(100))]
        got = await asyncio.gather(*(c.read(o, n) for o, n in reads))
        for (o, n), data in zip(reads, got):
            assert data == bytes(ref[o:o + n])
        await c.write_zeroes(0, 8192)
        ref[0:8192] = bytes(8192)
        await c.trim(1 * MiB, 64 * 1024)
        assert await c.read(0, 8192) == bytes(8192)
        await c.close()

    run(main())
    with open(img, "rb") as f:
        disk = f.read()
    # trimmed range is unspecified by NBD; everything else must equal the reference
    assert disk[:MiB] == bytes(ref[:MiB])
    assert disk[MiB + 64 * 1024:] == bytes(ref[MiB + 64 * 1024:])


def test_errors_carry_errno(tmp_path, isu_factory):
    isu = isu_factory([f"{tmp_path}/e.img:1M"])

    async def main():
        with pytest.raises(OSError) as ei:
            await NBDClient.connect("127.0.0.1", isu.port, "nosuchdisk")
        assert ei.value.errno == errno.ENOENT
        c = await NBDClient.connect("127.0.0.1", isu.port, "e")
        with pytest.raises(OSError) as ei:
            await c.write(MiB - 10, b"x" * 20)
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as ei:
            await c.read(MiB, 1)
        assert ei.value.errno == errno.EINVAL
        # the connection is still usable after refused requests
        await c.write(0, b"still here")
        assert await c.read(0, 10) == b"still here"
        assert await list_exports("127.0.0.1", isu.port) == [("e", f"ISU disk {tmp_path}/e.img")]
        await c.close()

    run(main())


def test_tls_client(tmp_path, isu_factory, cluster_tls):
    isu = isu_factory([f"{tmp_path}/t.img:4M"], tls_dir=cluster_tls["dir"])
    foreign_ca, foreign = tmp_path / "fca", tmp_path / "foreign"
    tls.create_ca(foreign_ca)
    tls.issue(foreign_ca, foreign)
    shutil.copy(os.path.join(cluster_tls["dir"], "ca-cert.pem"), foreign / "ca-cert.pem")

    async def main():
        c = await NBDClient.connect("127.0.0.1", isu.port, "t", tls_dir=cluster_tls["dir"])
        await c.write(4096, b"secret", fua=True)
        assert await c.read(4096, 6) == b"secret"
        await c.close()
        with pytest.raises(OSError) as ei:  # no TLS at all
            await NBDClient.connect("127.0.0.1", isu.port, "t")
        assert ei.value.errno == errno.EACCES
        with pytest.raises(OSError):  # a client identity from another CA
            await NBDClient.connect("127.0.0.1", isu.port, "t", tls_dir=str(foreign), timeout=5)

    run(main())


def test_timeout_then_recovery_when_isu_is_stopped_and_continued(tmp_path, isu_factory):
    isu = isu_factory([f"{tmp_path}/s.img:1M"])

    async def main():
        c = await NBDClient.connect("127.0.0.1", isu.port, "s", timeout=1.0)
        await c.write(0, b"before")
        freeze(isu.proc.pid)  # every thread, before the request goes out
        try:
            with pytest.raises(OSError) as ei:
                await c.read(0, 6)
            assert ei.value.errno == errno.ETIMEDOUT
        finally:
            os.kill(isu.proc.pid, signal.SIGCONT)
        c.timeout = 10.0
        assert await c.read(0, 6) == b"before"  # reconnected on demand
        assert c.reconnects >= 1
        await c.close()

    run(main())


def restart(isu_factory, isu, disk: str, *, disk_as_of=None):
    """SIGKILL `isu`, then serve `disk` again on the same port (and state
    dir). `disk_as_of`: a copy of the disk to put back first, as a machine
    that lost its write cache would come back."""
    isu.proc.kill()
    isu.proc.wait(5)
    if disk_as_of is not None:
        os.replace(disk_as_of, disk)
    return isu_factory([disk], port=isu.port)


def test_reconnect_after_isu_restart(tmp_path, isu_factory):
    img = f"{tmp_path}/r.img"
    isu = isu_factory([f"{img}:2M"])

    async def main():
        c = await NBDClient.connect("127.0.0.1", isu.port, "r", timeout=10)
        await c.write(0, b"A" * 4096)
        await c.flush()
        restart(isu_factory, isu, img)
        # in-flight and new requests go over a new connection
        await c.write(4096, b"B" * 4096, fua=True)
        assert await c.read(0, 8192) == b"A" * 4096 + b"B" * 4096
        assert c.reconnects == 1
        await c.close()

    run(main())


def test_writes_lost_with_a_restarted_isu_fail_the_next_flush(tmp_path, isu_factory):
    """Issue 9, 2.5: writes acknowledged without FUA live in the ISU's cache
    until a FLUSH. The ISU dies and comes back without them (its disk as of
    the last FLUSH); after the reconnect the next FLUSH must not succeed, as
    if they were durable: it fails with EIO, once."""
    img = f"{tmp_path}/l.img"
    isu = isu_factory([f"{img}:2M"])
    flushed = f"{tmp_path}/flushed.img"

    async def main():
        lost = []
        c = await NBDClient.connect("127.0.0.1", isu.port, "l", timeout=10, on_lost=lost.extend)
        await c.write(0, b"A" * 4096)
        await c.flush()
        shutil.copyfile(img, flushed)              # the disk as the last FLUSH left it
        await c.write(4096, b"B" * 4096)           # acknowledged, not flushed
        restart(isu_factory, isu, img, disk_as_of=flushed)
        with pytest.raises(OSError) as ei:
            await c.flush()
        assert ei.value.errno == errno.EIO
        assert c.reconnects == 1 and lost == [(4096, 4096)]
        # the loss is real, and reported once: the connection goes on
        assert await c.read(0, 8192) == b"A" * 4096 + bytes(4096)
        await c.write(4096, b"C" * 4096)
        await c.flush()
        assert await c.read(4096, 4096) == b"C" * 4096
        await c.close()

    run(main())


def test_verify_hook_sees_the_new_connection_and_can_refuse_it(tmp_path, isu_factory):
    """`verify` runs on a re-established connection before anything is
    re-sent, reads through it, and refusing (ExportChanged) fails the waiting
    request with ESTALE instead of sending it to the wrong export."""
    img = f"{tmp_path}/v.img"
    isu = isu_factory([f"{img}:2M"])
    seen = []

    async def verify(read):
        seen.append(bytes(await read(0, 4)))
        if len(seen) > 1:
            raise ExportChanged("not the export we had")

    async def main():
        c = await NBDClient.connect("127.0.0.1", isu.port, "v", timeout=10, verify=verify)
        await c.write(0, b"ours", fua=True)
        assert seen == []                          # not on the first connection
        again = restart(isu_factory, isu, img)
        assert await c.read(0, 4) == b"ours" and seen == [b"ours"]
        restart(isu_factory, again, img)
        with pytest.raises(OSError) as ei:
            await c.write(4096, b"x" * 4096, fua=True)
        assert ei.value.errno == errno.ESTALE and seen == [b"ours", b"ours"]
        await c.close()

    run(main())
    with open(img, "rb") as f:
        assert f.read(8192)[4096:] == bytes(4096)  # the refused write never reached the disk
