"""Scenario head-05: a thin volume larger than the pool, filled while
snapshots hold its old data, until space runs out.

Does: create a thin volume twice the pool's size; write it through its NBD
export (TLS) in rounds, taking a snapshot after each round, until a write
fails.
Must hold: the failing write gets ENOSPC (not EIO, not a short success);
every round acknowledged before still reads back from the volume, and each
snapshot still reads exactly what it froze; after deleting the snapshots,
writing works again.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib

import pytest

from opie.nbd import uri as nbd_uri
from opie.nbd.client import NBDClient

CHUNK = 1 << 20


def pattern(rnd: int, i: int) -> bytes:
    return hashlib.sha256(f"{rnd}/{i}".encode()).digest() * (CHUNK // 32)


def test_enospc_with_snapshots_held(head_lab):
    lab, api = head_lab
    pool = api.status()["pool"]
    size = (2 * pool["total_bytes"]) // CHUNK * CHUNK
    vol = api.call("POST", "/v1/volumes", {"name": "thin", "size": size})
    u = nbd_uri.parse(vol["export"])
    span = pool["free_bytes"] // 3 // CHUNK  # each round rewrites the same span: CoW eats free space
    tls_dir = lab.lab["tls_certificates"]

    async def main():
        c = await NBDClient.connect(u.host, u.port, u.export, tls_dir=tls_dir, timeout=60)
        rounds = []
        try:
            rnd = 0
            while True:
                try:
                    for i in range(span):
                        await c.write(i * CHUNK, pattern(rnd, i))
                    await c.flush()
                except OSError as exc:
                    failed = exc
                    break
                rounds.append(rnd)
                api.call("POST", "/v1/snapshots", {"volume": "thin", "name": f"r{rnd}"})
                rnd += 1
                assert rnd < 20, "space never ran out"
            assert failed.errno == errno.ENOSPC, failed
            # the last complete round is still the live content where the failed round did not reach
            assert rounds, "not even one round fitted"
            last = rounds[-1]
            for rnd in rounds:  # every snapshot reads what it froze
                snap_uri = nbd_uri.parse(vol["export"] + f"@r{rnd}")
                s = await NBDClient.connect(snap_uri.host, snap_uri.port, snap_uri.export, tls_dir=tls_dir)
                for i in (0, span // 2, span - 1):
                    assert await s.read(i * CHUNK, CHUNK) == pattern(rnd, i)
                await s.close()
            tail = await c.read((span - 1) * CHUNK, CHUNK)
            assert tail in (pattern(last, span - 1), pattern(last + 1, span - 1))
            # free space again: delete the snapshots, and writing works
            for rnd in rounds:
                api.call("DELETE", f"/v1/snapshots/thin/r{rnd}")
            for i in range(span):
                await c.write(i * CHUNK, pattern(100, i))
            await c.flush()
            assert await c.read(0, CHUNK) == pattern(100, 0)
        finally:
            await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 600))
    finally:
        api.call("DELETE", "/v1/volumes/thin", {"recursive": True})
    assert "thin" not in [v["name"] for v in api.status()["volumes"]]
