"""Volumes and snapshots served as they are by the real NBD server, with
real clients (nbdcopy, nbdinfo) on the other side."""

from __future__ import annotations

import asyncio
import json
import random

from opie.head.volumes import MemoryDevice, Pool
from opie.nbd.export import Export
from opie.nbd.server import NBDServer

MIB = 1 << 20


async def client(*argv: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out


async def serve_and_copy(tmp_path) -> None:
    pool = await Pool.format(MemoryDevice(64 * MIB), segment_size=256 * 1024)
    await pool.create_volume("vol", 16 * MIB)
    vol = pool.open_volume("vol")
    old = random.Random(1).randbytes(16 * MIB)
    await vol.write(0, old)
    await pool.create_snapshot("vol", "before")
    snap = pool.open_snapshot("vol", "before")
    assert isinstance(vol, Export) and isinstance(snap, Export)
    server = NBDServer({"vol": vol, "vol@before": snap})
    host, port = await server.start("127.0.0.1", 0)
    try:
        new = random.Random(2).randbytes(5 * MIB + 12345)
        (tmp_path / "new").write_bytes(new)
        # a real client writes the new data over the start of the volume
        await client("nbdcopy", "--flush", str(tmp_path / "new"),
                     f"nbd://{host}:{port}/vol")
        assert await vol.read(0, 16 * MIB) == new + old[len(new):]
        # and reads the old contents back from the snapshot export
        await client("nbdcopy", f"nbd://{host}:{port}/vol@before", str(tmp_path / "snap"))
        assert (tmp_path / "snap").read_bytes() == old
        info = json.loads(await client("nbdinfo", "--json", f"nbd://{host}:{port}/vol@before"))
        assert info["exports"][0]["is_read_only"] is True
        assert info["exports"][0]["export-size"] == 16 * MIB
    finally:
        await server.close()
    assert pool.check().problems == []


def test_volume_and_snapshot_as_nbd_exports(tmp_path) -> None:
    asyncio.run(serve_and_copy(tmp_path))
