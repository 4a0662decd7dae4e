"""The head's RAID members over real ISUs with TLS, in both places member I/O
can run (head config `member_io_thread`): on the head's own loop and on the
member thread. Same contract either way: data round-trips through the array,
an unreachable member is None (the array assembles degraded), a stopped ISU
turns into OSError with an errno, and degraded reads reconstruct."""
from __future__ import annotations

import asyncio
import errno
import os

import pytest

from opie.head.members import MemberWatcher, connect_all
from opie.nbd import tls
from opie.raid5.assemble import assemble, create

CHUNK = 64 * 1024


@pytest.mark.parametrize("io_thread", [False, True], ids=["caller-loop", "member-thread"])
def test_array_over_remote_members(tmp_path, isu_factory, cluster_tls, io_thread):
    isus = [isu_factory([f"{tmp_path}/d{i}.img:24M"], name=f"isu{i}", tls_dir=cluster_tls["dir"])
            for i in range(3)]
    uris = [f"nbds://127.0.0.1:{i.port}/d{n}" for n, i in enumerate(isus)]
    ctx = tls.client_context(cluster_tls["dir"])
    data = os.urandom(3 * 2 * CHUNK * 7 + 4096)  # whole stripes and a partial one

    async def main():
        members = await connect_all(uris, ctx, io_thread=io_thread)
        assert all(m is not None for m in members)
        arr = await create(members, chunk_size=CHUNK, ppl_size=1 << 20, assume_clean=True)
        await arr.write(8192, data, fua=True)
        assert bytes(await arr.read(8192, len(data))) == data
        await arr.stop()
        for m in members:
            await m.close()

        # an ISU that is gone: None in its place, and the array assembles degraded
        isus[1].proc.kill()
        isus[1].proc.wait(10)
        again = await connect_all(uris, ctx, io_thread=io_thread)
        assert again[1] is None and again[0] is not None and again[2] is not None
        arr = await assemble([again[0], again[2]])
        assert sorted(arr.state_string()) == sorted("UU_")
        assert bytes(await arr.read(8192, len(data))) == data  # reconstructed from parity
        await arr.stop()

        # a member whose ISU stops mid-life: its requests fail with an errno
        isus[2].proc.kill()
        isus[2].proc.wait(10)
        with pytest.raises(OSError) as ei:
            await again[2].read(0, 4096)
        assert ei.value.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE, errno.ETIMEDOUT,
                                  errno.ESHUTDOWN, errno.EIO, errno.ENOTCONN)
        for m in (again[0], again[2]):
            await m.close()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_watcher_re_adds_a_returning_member_and_closes_its_dead_client(tmp_path, isu_factory, cluster_tls):
    isus = [isu_factory([f"{tmp_path}/d{i}.img:24M"], name=f"isu{i}", tls_dir=cluster_tls["dir"])
            for i in range(3)]
    uris = [f"nbds://127.0.0.1:{i.port}/d{n}" for n, i in enumerate(isus)]
    ctx = tls.client_context(cluster_tls["dir"])
    first, second = os.urandom(6 * CHUNK), os.urandom(6 * CHUNK)

    async def main():
        members = await connect_all(uris, ctx)
        arr = await create(members, chunk_size=CHUNK, ppl_size=1 << 20, assume_clean=True)
        await arr.write(0, first, fua=True)
        port = isus[1].port
        isus[1].proc.kill()
        isus[1].proc.wait(10)
        await arr.write(0, second, fua=True)  # misses the dead member: its role fails
        assert sorted(arr.state_string()) == sorted("UU_")
        dead = members[1]

        isu_factory([f"{tmp_path}/d1.img"], name="isu1", tls_dir=cluster_tls["dir"], port=port)
        watcher = MemberWatcher(arr, uris, ctx, interval=0.2)
        await watcher.check_once()
        assert arr.slots[1].member is not dead and arr.slots[1].member.name == uris[1]
        for _ in range(200):  # the resync of what it missed runs in the background
            if arr.state_string() == "UUU":
                break
            await asyncio.sleep(0.05)
        assert arr.state_string() == "UUU"
        await watcher.stop()
        assert dead.client._closed  # the replaced client is closed, not leaked

        # the returning member holds what it missed: lose another one, read back
        isus[2].proc.kill()
        isus[2].proc.wait(10)
        assert bytes(await arr.read(0, len(second))) == second
        await arr.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
