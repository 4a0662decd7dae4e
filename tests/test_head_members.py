"""The head's RAID members over real ISUs with TLS, in both places member I/O
can run (head config `member_io_thread`): on the head's own loop and on the
member thread. Same contract either way: data round-trips through the array,
an unreachable member is None (the array assembles degraded), a stopped ISU
turns into OSError with an errno, and degraded reads reconstruct."""
from __future__ import annotations

import asyncio
import errno
import os
import shutil

import pytest

from opie.head.members import MemberWatcher, connect_all
from opie.nbd import tls
from opie.raid5.assemble import assemble, create
from opie.raid5.member import FileMember

CHUNK = 64 * 1024
DISK = 24 << 20


def three_isus(tmp_path, isu_factory, cluster_tls):
    isus = [isu_factory([f"{tmp_path}/d{i}.img:{DISK}"], name=f"isu{i}", tls_dir=cluster_tls["dir"])
            for i in range(3)]
    return isus, [f"nbds://127.0.0.1:{i.port}/d{n}" for n, i in enumerate(isus)]


@pytest.mark.parametrize("io_thread", [False, True], ids=["caller-loop", "member-thread"])
def test_array_over_remote_members(tmp_path, isu_factory, cluster_tls, io_thread):
    isus, uris = three_isus(tmp_path, isu_factory, cluster_tls)
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
    isus, uris = three_isus(tmp_path, isu_factory, cluster_tls)
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


def test_member_that_lost_unflushed_writes_is_failed_and_resynced(tmp_path, isu_factory, cluster_tls):
    """Issue 9, 2.5: writes the array got acknowledged without FUA are lost
    when member ISU1 dies (it comes back with every FUA write - superblock,
    bitmap, log - but its chunks as of the last flush). The member must count
    as having missed them: failed at the next flush, not trusted, then
    re-added with those regions resynced, so losing another member later
    still reads back what was written."""
    isus, uris = three_isus(tmp_path, isu_factory, cluster_tls)
    ctx = tls.client_context(cluster_tls["dir"])
    first, second = os.urandom(6 * CHUNK), os.urandom(6 * CHUNK)
    disk1, saved = f"{tmp_path}/d1.img", f"{tmp_path}/d1.flushed"

    async def main():
        arr = await create(await connect_all(uris, ctx), chunk_size=CHUNK, ppl_size=1 << 20,
                           assume_clean=True)
        await arr.write(0, first)
        await arr.flush()
        shutil.copyfile(disk1, saved)
        await arr.write(0, second)                 # acknowledged, not flushed
        port = isus[1].port
        isus[1].proc.kill()
        isus[1].proc.wait(10)
        with open(saved, "rb") as src, open(disk1, "r+b") as dst:   # its cache died with it
            src.seek(arr.geom.data_offset)
            dst.seek(arr.geom.data_offset)
            shutil.copyfileobj(src, dst)
        isu_factory([disk1], name="isu1", tls_dir=cluster_tls["dir"], port=port)
        await arr.flush()
        assert arr.state_string() == "U_U"        # it missed writes: failed, not trusted

        watcher = MemberWatcher(arr, uris, ctx, interval=0.2)
        await watcher.check_once()
        await asyncio.wait_for(arr.wait_idle(), 60)   # the resync of what it missed
        assert arr.state_string() == "UUU"
        await watcher.stop()
        isus[2].proc.kill()
        isus[2].proc.wait(10)
        assert bytes(await arr.read(0, len(second))) == second
        await arr.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_member_export_swapped_for_another_arrays_member_is_refused(tmp_path, isu_factory, cluster_tls):
    """Issue 9, 2.5: after a reconnect the member client checks who answers,
    not just the size: ISU1 comes back serving, under the same address and
    export name, a disk of the same size that belongs to another array. The
    member's requests are refused, the array reads around it, and the watcher
    does not take it back."""
    isus, uris = three_isus(tmp_path, isu_factory, cluster_tls)
    ctx = tls.client_context(cluster_tls["dir"])
    data = os.urandom(6 * CHUNK)

    async def main():
        members = await connect_all(uris, ctx)
        arr = await create(members, chunk_size=CHUNK, ppl_size=1 << 20, assume_clean=True)
        await arr.write(0, data, fua=True)
        others = [FileMember(f"{tmp_path}/other{i}.img", size=DISK) for i in range(3)]
        await create(others, chunk_size=CHUNK, ppl_size=1 << 20, assume_clean=True)
        for m in others:
            m.close()
        port = isus[1].port
        isus[1].proc.kill()
        isus[1].proc.wait(10)
        os.replace(f"{tmp_path}/other1.img", f"{tmp_path}/d1.img")
        isu_factory([f"{tmp_path}/d1.img"], name="isu1", tls_dir=cluster_tls["dir"], port=port)
        with pytest.raises(OSError):
            await members[1].read(0, 4096)
        assert bytes(await arr.read(0, len(data))) == data
        assert arr.state_string() == "U_U"
        watcher = MemberWatcher(arr, uris, ctx)
        await watcher.check_once()
        assert uris[1] in watcher.refused and arr.state_string() == "U_U"
        await watcher.stop()
        await arr.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
