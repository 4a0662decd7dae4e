"""A failed ISU disk refuses every request that touches it (issue 9, 2.7).

A real ISU process serves a file disk; the test shrinks the file under it, so
the next READ past the new end comes back short and the ISU marks the disk
failed. From then on TRIM and WRITE_ZEROES must get EIO like READ and WRITE,
and must not punch holes into the disk that failed.
"""
from __future__ import annotations

import asyncio
import errno
import os

import pytest

from opie.nbd.client import NBDClient

MiB = 1 << 20


def test_failed_disk_refuses_trim_and_write_zeroes(tmp_path, isu_factory):
    img = tmp_path / "f.img"
    isu = isu_factory([f"{img}:4M"])

    async def main():
        c = await NBDClient.connect("127.0.0.1", isu.port, "f", timeout=10)
        try:
            await c.write(0, b"\xab" * 8192, fua=True)
            os.truncate(img, 1 * MiB)              # the disk loses its tail under the ISU
            with pytest.raises(OSError) as ei:
                await c.read(2 * MiB, 4096)        # short read: the disk fails
            assert ei.value.errno == errno.EIO
            with pytest.raises(OSError) as ei:
                await c.read(0, 4096)              # failed for good, even where it has bytes
            assert ei.value.errno == errno.EIO
            with pytest.raises(OSError) as ei:
                await c.trim(0, 4096)
            assert ei.value.errno == errno.EIO
            with pytest.raises(OSError) as ei:
                await c.write_zeroes(0, 4096)
            assert ei.value.errno == errno.EIO
            with pytest.raises(OSError) as ei:
                await c.write_zeroes(4096, 4096, may_trim=False)
            assert ei.value.errno == errno.EIO
        finally:
            await c.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    with open(img, "rb") as f:                     # nothing was discarded on the failed disk
        assert f.read(8192) == b"\xab" * 8192
