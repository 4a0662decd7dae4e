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

from head.members import connect_all
from nbd import tls
from raid5.assemble import assemble, create

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
