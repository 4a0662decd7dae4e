"""The passive head's warm copy of the mapping table (issue 10, point 4).

The pool's commit hook hands every committed metadata transaction to the
mirror before the commit returns; the mirror sends it over mutual TLS (head
certificates only) to the passive, which persists it before it acknowledges.
"""
from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from opie.head.ha import mirror_frames as mf
from opie.head.ha.errors import FrameError, MirrorError
from opie.head.ha.mirror import MirrorReceiver, MirrorSender, MirrorState, read_frame
from opie.head.ha.mirror_copy import BASE, LOG, MirrorCopy
from opie.head.volumes import MemoryDevice, Pool
from opie.head.volumes.core import MetadataCommit
from opie.nbd import tls
from proc_support import free_port, freeze, stop, wait_port

SEG = 16 * 1024
DEV = 2 << 20
BOUND = 0.5          # the sender's timeout: how long a commit may wait for the passive
ROOT = Path(__file__).resolve().parent.parent
RECEIVER = """
import asyncio, sys
from opie.head.ha.mirror import MirrorReceiver
async def main():
    await MirrorReceiver(sys.argv[1], sys.argv[2]).start("127.0.0.1", int(sys.argv[3]))
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def new_pool() -> tuple[Pool, MemoryDevice]:
    device = MemoryDevice(DEV)
    return await Pool.format(device, segment_size=SEG, max_entries=62), device


async def pages_of(device: MemoryDevice) -> tuple[tuple[uuid.UUID, int], list[bytes]]:
    """(generation, every page) of the pool on `device` as committed there."""
    pool = await Pool.open(device)
    base = await pool.set_commit_hook(None)
    return pool.generation, [base.pages[p] for p in sorted(base.pages)]


def test_commit_hook_sees_every_transaction_in_order_before_the_commit_returns() -> None:
    async def body() -> None:
        pool, device = await new_pool()
        seen: list[MetadataCommit] = []
        release = asyncio.Event()

        async def hook(record: MetadataCommit) -> None:
            seen.append(record)
            await release.wait()

        base = await pool.set_commit_hook(hook)
        assert base.seq == 0 and sorted(base.pages) == list(range(len(base.pages)))
        assert pool.generation == (base.pool_uuid, 0)
        copy = dict(base.pages)
        create = asyncio.create_task(pool.create_volume("v", 256 * 1024))
        while not seen:
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert not create.done()            # the commit waits for the hook
        release.set()
        await asyncio.wait_for(create, 5)
        dev = pool.open_volume("v")
        await dev.write(0, b"x" * SEG)
        await dev.flush()
        await pool.create_snapshot("v", "s1")
        await dev.write(SEG, b"y" * 512)
        await dev.flush()
        await pool.delete_snapshot("v", "s1")
        assert [r.seq for r in seen] == list(range(1, len(seen) + 1))
        assert all(r.pool_uuid == base.pool_uuid for r in seen)
        for r in seen:
            copy.update(r.pages)
        assert pool.generation == (base.pool_uuid, seen[-1].seq)
        assert (pool.generation, [copy[p] for p in sorted(copy)]) == await pages_of(device)
    asyncio.run(body())


# -- frames and the on-disk copy -----------------------------------------
def page(fill: int) -> bytes:
    return bytes([fill]) * mf.PAGE_SIZE


def test_frames_round_trip_and_every_damaged_byte_is_refused() -> None:
    pool = uuid.uuid4()
    full = mf.Pages(pool, 0, 7, {0: page(1), 1: page(2)})
    data = full.frame(mf.FULL)
    assert mf.unframe(data) == (mf.FULL, full.to_bytes())
    assert mf.Pages.from_bytes(mf.FULL, mf.unframe(data)[1]) == full
    reply = mf.Reply(False, pool, 7, "no")
    assert mf.Reply.from_bytes(*mf.unframe(reply.frame())) == reply
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(FrameError):
            kind, payload = mf.unframe(bytes(bad))
            mf.Pages.from_bytes(kind, payload)
    for cut in (0, 5, mf.HEADER_SIZE, len(data) - 1):
        with pytest.raises(FrameError):
            mf.unframe(data[:cut])
    with pytest.raises(FrameError, match="full copy page numbers"):
        mf.Pages.from_bytes(mf.FULL, mf.Pages(pool, 0, 1, {1: page(0)}).to_bytes())
    with pytest.raises(FrameError, match="record seq"):
        mf.Pages.from_bytes(mf.RECORD, mf.Pages(pool, 3, 3, {}).to_bytes())


def test_copy_survives_reload_cuts_a_torn_tail_and_refuses_a_gap(tmp_path: Path) -> None:
    pool = uuid.uuid4()
    copy = MirrorCopy(tmp_path)
    assert copy.pool_uuid is None
    copy.replace(mf.Pages(pool, 0, 3, {n: page(0) for n in range(4)}))
    copy.apply(mf.Pages(pool, 3, 4, {1: page(9)}))
    with pytest.raises(MirrorError, match="expected pool .* at 4, got pool .* at 5"):
        copy.apply(mf.Pages(pool, 5, 6, {2: page(9)}))
    with open(tmp_path / LOG, "ab") as f:          # a record a crash cut short
        f.write(mf.Pages(pool, 4, 5, {2: page(7)}).frame(mf.RECORD)[:100])
    again = MirrorCopy(tmp_path)
    assert (again.pool_uuid, again.seq) == (pool, 4)
    assert again.table() == [page(0), page(9), page(0), page(0)]
    again.apply(mf.Pages(pool, 4, 5, {2: page(7)}))   # appends after the cut
    assert MirrorCopy(tmp_path).table() == again.table()
    for seq in range(6, 12):                        # the log outgrows the base: folded into it
        again.apply(mf.Pages(pool, seq - 1, seq, {seq % 4: page(seq)}))
    assert (tmp_path / LOG).stat().st_size < (tmp_path / BASE).stat().st_size
    reloaded = MirrorCopy(tmp_path)
    assert (reloaded.seq, reloaded.table()) == (11, again.table())
    (tmp_path / BASE).write_bytes(b"garbage")
    assert MirrorCopy(tmp_path).pool_uuid is None   # damaged: holds nothing, claims nothing


# -- sender and receiver over TLS ----------------------------------------
class Watch:
    """Collects the sender's states; `until(state)` waits for one, bounded."""

    def __init__(self) -> None:
        self.seen: list[MirrorState] = []
        self.changed = asyncio.Event()

    def __call__(self, state: MirrorState) -> None:
        self.seen.append(state)
        self.changed.set()

    async def until(self, state: MirrorState, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.seen or self.seen[-1] is not state:
                self.changed.clear()
                await self.changed.wait()


def start_receiver(state: Path, tls_dir: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(state), tls_dir, str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
    except BaseException:
        stop(proc)
        raise
    return proc


async def assert_mirrored(device: MemoryDevice, state: Path) -> None:
    """The passive's persisted copy (read back from its files) is the array's
    committed metadata, page for page, at the same generation."""
    generation, pages = await pages_of(device)
    copy = MirrorCopy(state)
    assert (copy.pool_uuid, copy.seq) == generation
    assert copy.table() == pages


def test_passive_follows_every_commit_survives_loss_and_catches_up(tmp_path: Path,
                                                                   cluster_tls) -> None:
    state = tmp_path / "passive"
    port = free_port()
    procs = [start_receiver(state, cluster_tls["dir"], port)]

    async def body() -> None:
        pool, device = await new_pool()
        watch = Watch()
        sender = MirrorSender("127.0.0.1", port, cluster_tls["dir"], on_state=watch,
                              timeout=BOUND, retry=0.1, ping_interval=0.005)
        sender.start(await pool.set_commit_hook(sender.on_commit))
        try:
            await watch.until(MirrorState.CURRENT)
            await assert_mirrored(device, state)
            # every management call and every flush that placed segments:
            # after each, the passive's files hold the array's metadata
            steps = [lambda: pool.create_volume("a", 512 * 1024),
                     lambda: pool.create_volume("b", 256 * 1024)]
            for step in steps:
                await step()
                await assert_mirrored(device, state)
            a = pool.open_volume("a")
            for i, step in enumerate([
                    lambda: a.write(0, b"1" * 3 * SEG),
                    lambda: pool.create_snapshot("a", "s1"),
                    lambda: a.write(SEG, b"2" * 4096),
                    lambda: pool.create_snapshot("a", "s2"),
                    lambda: a.write(5 * SEG, b"3" * SEG),
                    lambda: pool.delete_snapshot("a", "s1"),
                    lambda: pool.resize_volume("b", 128 * 1024),
                    lambda: pool.delete_volume("b")]):
                await step()
                await a.flush()
                await assert_mirrored(device, state)
            assert watch.seen == [MirrorState.CURRENT]
            acked = pool.generation

            # the passive stops answering: a commit returns within the bound
            freeze(procs[0].pid)
            t0 = time.monotonic()
            await pool.create_volume("c", 64 * 1024)
            assert time.monotonic() - t0 < BOUND + 0.3
            assert sender.state is MirrorState.STALE and watch.seen[-1] is MirrorState.STALE
            os.kill(procs[0].pid, signal.SIGKILL)
            procs[0].wait(10)
            # gone: commits do not wait at all
            t0 = time.monotonic()
            for name in ("d", "e"):
                await pool.create_volume(name, 64 * 1024)
            await pool.create_snapshot("a", "s3")
            assert time.monotonic() - t0 < BOUND
            # what the killed passive persisted is durable: the last acknowledged state
            copy = MirrorCopy(state)
            assert (copy.pool_uuid, copy.seq) == acked
            assert copy.table() != (await pages_of(device))[1]

            # it returns: a full copy, tables equal again, then records again
            procs.append(start_receiver(state, cluster_tls["dir"], port))
            await watch.until(MirrorState.CURRENT)
            await assert_mirrored(device, state)
            await pool.delete_snapshot("a", "s2")
            await assert_mirrored(device, state)
            assert watch.seen == [MirrorState.CURRENT, MirrorState.STALE, MirrorState.CURRENT]
        finally:
            await sender.close()
            await pool.set_commit_hook(None)
    try:
        asyncio.run(body())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_takeover_reuses_the_copy_only_at_the_array_generation(tmp_path: Path,
                                                                cluster_tls) -> None:
    async def body() -> None:
        receiver = MirrorReceiver(tmp_path / "passive", cluster_tls["dir"])
        port = await receiver.start("127.0.0.1", 0)
        pool, device = await new_pool()
        watch = Watch()
        sender = MirrorSender("127.0.0.1", port, cluster_tls["dir"], on_state=watch, timeout=BOUND)
        sender.start(await pool.set_commit_hook(sender.on_commit))
        try:
            await watch.until(MirrorState.CURRENT)
            await pool.create_volume("v", 64 * 1024)
            generation, pages = await pages_of(device)
            assert receiver.table_for(*generation) == pages
            await sender.close()                 # the active commits once more, unmirrored
            await pool.create_volume("w", 64 * 1024)
            assert receiver.table_for(*pool.generation) is None
            assert receiver.table_for(uuid.uuid4(), generation[1]) is None
        finally:
            await sender.close()
            await receiver.close()
    asyncio.run(body())


# -- who may connect, and what a bad frame changes ------------------------
async def connect(port: int, tls_dir: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=tls.client_context(tls_dir), server_hostname="127.0.0.1"), 5)


async def closed(reader: asyncio.StreamReader) -> bool:
    """True if the peer closes the connection without sending anything more."""
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def files(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state.iterdir())}


def test_only_heads_connect_and_a_corrupt_frame_changes_nothing(tmp_path: Path,
                                                                 cluster_tls) -> None:
    async def body() -> None:
        state = tmp_path / "passive"
        receiver = MirrorReceiver(state, cluster_tls["dir"])
        port = await receiver.start("127.0.0.1", 0)
        pool_id = uuid.uuid4()
        full = mf.Pages(pool_id, 0, 5, {n: page(n) for n in range(3)})
        try:
            # a head sets a copy
            reader, writer = await connect(port, cluster_tls["dir"])
            writer.write(full.frame(mf.FULL))
            reply = mf.Reply.from_bytes(*await asyncio.wait_for(read_frame(reader), 5))
            assert (reply.ok, reply.pool_uuid, reply.seq) == (True, pool_id, 5)
            before = files(state)

            # a record that does not follow the copy: refused, the channel stays
            writer.write(mf.Pages(pool_id, 6, 7, {0: page(9)}).frame(mf.RECORD))
            reply = mf.Reply.from_bytes(*await asyncio.wait_for(read_frame(reader), 5))
            assert not reply.ok and "at 5, got pool" in reply.reason and reply.seq == 5

            # a corrupt frame (one payload byte flipped): NACK, then closed
            bad = bytearray(mf.Pages(pool_id, 5, 6, {0: page(9)}).frame(mf.RECORD))
            bad[-1] ^= 1
            writer.write(bytes(bad))
            reply = mf.Reply.from_bytes(*await asyncio.wait_for(read_frame(reader), 5))
            assert not reply.ok and "crc32" in reply.reason
            assert await closed(reader)
            writer.close()
            assert files(state) == before and receiver.generation == (pool_id, 5)

            # an ISU's certificate: closed before any frame is read
            reader, writer = await connect(port, cluster_tls["isu"])
            writer.write(mf.Pages(uuid.uuid4(), 0, 9, {0: page(1)}).frame(mf.FULL))
            assert await closed(reader)
            writer.close()
            # no certificate at all: the handshake fails
            noclient = tmp_path / "nocert"
            noclient.mkdir()
            (noclient / tls.CA_CERT).write_bytes((Path(cluster_tls["dir"]) / tls.CA_CERT).read_bytes())
            try:
                reader, writer = await connect(port, str(noclient))
                writer.write(full.frame(mf.FULL))
                assert await closed(reader)
                writer.close()
            except (ConnectionError, ssl.SSLError):
                pass
            # a sender with an ISU's certificate never gets the passive current
            watch = Watch()
            sender = MirrorSender("127.0.0.1", port, cluster_tls["isu"], on_state=watch,
                                  timeout=BOUND, retry=0.05)
            sender.start(MetadataCommit(uuid.uuid4(), 1, {0: page(3)}))
            await asyncio.sleep(0.5)      # ~10 attempts, each refused
            await sender.close()
            assert watch.seen == [] and sender.state is MirrorState.STALE
            assert files(state) == before and receiver.generation == (pool_id, 5)
        finally:
            await receiver.close()
    asyncio.run(body())
