"""WRITE payloads received with splice(2) (nbd/splice.py) on plain TCP.

The server runs in this process (two worker loops, like the ISU) so a test
can see that payloads really went through the splicer
(`NBDServer.payloads_spliced`) and can inject failures; the clients are real:
nbdcopy, our NBDClient, and a raw socket for what no polite client does
(refused writes, a disconnect or a stall in the middle of a payload)."""
from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import subprocess
import threading
import time

import pytest

from opie.nbd import codec, tls
from opie.nbd.client import NBDClient
from opie.nbd.constants import ClientFlag, Command, CommandFlag, Errno, Option
from opie.nbd.export import FileExport
from opie.nbd.server import NBDServer, TLSMode
from proc_support import random_file, stop

MiB = 1 << 20


class ServerThread:
    """An NBDServer on its own event loop thread; close() stops everything."""

    def __init__(self, exports: dict, **kw):
        kw.setdefault("workers", 2)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-nbd-server", daemon=True)
        self.thread.start()
        self.server = NBDServer(exports, **kw)
        self.host, self.port = self.call(self.server.start("127.0.0.1", 0))

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def url(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def serve():
    started: list[tuple[ServerThread, list[FileExport]]] = []

    def start(exports: list[FileExport], **kw) -> ServerThread:
        st = ServerThread({e.name: e for e in exports}, **kw)
        started.append((st, exports))
        return st

    yield start
    for st, exports in started:
        st.close()
        for e in exports:
            e.close()
    wait_for(lambda: not splice_threads(), "splice threads to exit")


def wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.02)


def splice_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nbd-splice")]


def make_image(path, size: int, seed: int | None = None) -> str:
    if seed is None:
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        random_file(path, size, seed=seed)
    return str(path)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def nbdcopy(*args: str) -> None:
    res = subprocess.run(["nbdcopy", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- raw client
def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"server closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def raw_connect(port: int, name: str) -> tuple[socket.socket, int]:
    """Fixed-newstyle handshake by hand; returns the socket and the export size."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    recv_exact(sock, codec.GREETING_SIZE)
    sock.sendall(codec.encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    sock.sendall(codec.encode_option(Option.EXPORT_NAME, name.encode()))
    size, _ = codec.decode_export_name_reply(recv_exact(sock, codec.EXPORT_NAME_REPLY.size))
    return sock, size


def raw_reply(sock: socket.socket) -> tuple[int, int]:
    """(error, cookie) of one simple reply."""
    _, err, cookie = codec.SIMPLE_REPLY.unpack(recv_exact(sock, codec.SIMPLE_REPLY_SIZE))
    return err, cookie


def raw_write(sock: socket.socket, cookie: int, offset: int, data: bytes, flags: int = 0) -> tuple[int, int]:
    sock.sendall(codec.encode_request(flags, Command.WRITE, cookie, offset, len(data)) + data)
    return raw_reply(sock)


def raw_read(sock: socket.socket, cookie: int, offset: int, length: int) -> bytes:
    sock.sendall(codec.encode_request(0, Command.READ, cookie, offset, length))
    err, got = raw_reply(sock)
    assert (err, got) == (0, cookie)
    return recv_exact(sock, length)


# ---------------------------------------------------------------- data moves
def test_nbdcopy_of_an_odd_size_file_lands_byte_for_byte(tmp_path, serve):
    size = 37 * MiB + 12345
    src = make_image(tmp_path / "src.img", size, seed=11)
    st = serve([FileExport(make_image(tmp_path / "odd.img", size), "odd")])
    nbdcopy(src, st.url("odd"))
    assert st.server.payloads_spliced > 0
    assert sha256(tmp_path / "odd.img") == sha256(src)
    nbdcopy(st.url("odd"), str(tmp_path / "back.img"))
    assert sha256(tmp_path / "back.img") == sha256(src)


def test_fua_write_is_synced_before_the_reply(tmp_path, serve, monkeypatch):
    export = FileExport(make_image(tmp_path / "f.img", 16 * MiB), "f")
    st = serve([export])
    synced: list[int] = []
    real = os.fdatasync

    def recording_fdatasync(fd):
        real(fd)
        synced.append(fd)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    data = os.urandom(3 * MiB + 7)

    async def main():
        c = await NBDClient.connect("127.0.0.1", st.port, "f")
        await c.write(MiB, data, fua=False)
        assert synced == [] and st.server.payloads_spliced >= 1
        before = st.server.payloads_spliced
        await c.write(5 * MiB, data, fua=True)
        assert synced == [export.fd] and st.server.payloads_spliced > before
        await c.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    with open(tmp_path / "f.img", "rb") as f:
        disk = f.read()
    assert disk[MiB:MiB + len(data)] == data and disk[5 * MiB:5 * MiB + len(data)] == data
    assert disk[:MiB] == bytes(MiB) and disk[MiB + len(data):5 * MiB] == bytes(4 * MiB - len(data))


@pytest.mark.parametrize("case", ["beyond-end", "read-only"])
def test_refused_write_changes_nothing_and_keeps_the_connection(tmp_path, serve, case):
    size = 8 * MiB
    path = make_image(tmp_path / "r.img", size, seed=5)
    want = sha256(path)
    st = serve([FileExport(path, "r", read_only=(case == "read-only"))])
    sock, _ = raw_connect(st.port, "r")
    with sock:
        payload = os.urandom(2 * MiB)
        offset, expect = (size - MiB, Errno.ENOSPC) if case == "beyond-end" else (0, Errno.EPERM)
        assert raw_write(sock, 1, offset, payload) == (expect, 1)
        # the payload was consumed: the next request is parsed in step
        assert raw_read(sock, 2, 0, 4096) == open(path, "rb").read(4096)
    assert st.server.payloads_spliced == 0
    assert sha256(path) == want


def test_failed_file_write_is_answered_and_reported(tmp_path, serve):
    class ReadOnlyFd(FileExport):
        """Hands the splicer a descriptor it cannot write: every splice fails."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.ro = os.open(self.path, os.O_RDONLY)
            self.errors: list[OSError] = []

        def splice_fd(self):
            return self.ro

        def io_error(self, exc):
            self.errors.append(exc)

        def close(self):
            os.close(self.ro)
            super().close()

    path = make_image(tmp_path / "b.img", 8 * MiB, seed=6)
    want = sha256(path)
    export = ReadOnlyFd(path, "b")
    st = serve([export])
    sock, _ = raw_connect(st.port, "b")
    with sock:
        err, cookie = raw_write(sock, 7, MiB, os.urandom(2 * MiB))
        assert err != 0 and cookie == 7
        assert raw_read(sock, 8, MiB, 4096) == open(path, "rb").read()[MiB:MiB + 4096]
    assert st.server.payloads_spliced == 1
    assert [e.errno for e in export.errors] == [errno.EBADF]
    assert sha256(path) == want


# ---------------------------------------------------------------- bad clients
@pytest.mark.parametrize("how", ["disconnect", "stall"])
def test_client_gone_mid_payload_hurts_nobody(tmp_path, serve, how):
    size = 16 * MiB
    path = make_image(tmp_path / "m.img", size, seed=8)
    with open(path, "rb") as f:
        before = f.read()
    st = serve([FileExport(path, "m")])
    offset, length = 4 * MiB, 4 * MiB
    sock, _ = raw_connect(st.port, "m")
    sock.sendall(codec.encode_request(0, Command.WRITE, 1, offset, length) + os.urandom(MiB + 4321))
    wait_for(lambda: st.server.payloads_spliced == 1, "the payload to reach the splicer")
    if how == "disconnect":
        sock.close()
        wait_for(lambda: not splice_threads(), "the splicer to give up")
    # others are served meanwhile, on both worker loops
    other = os.urandom(2 * MiB)

    async def main():
        clients = [await NBDClient.connect("127.0.0.1", st.port, "m") for _ in range(3)]
        await asyncio.gather(*(c.write(12 * MiB + i * 4096, other[:4096]) for i, c in enumerate(clients)))
        await clients[0].write(10 * MiB, other, fua=True)
        assert await clients[1].read(10 * MiB, len(other)) == other
        for c in clients:
            await c.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    if how == "stall":
        sock.close()  # the stalled splice ends with the stream
    with open(path, "rb") as f:
        after = f.read()
    # nothing outside the interrupted request's range (and the others' writes) changed
    assert after[:offset] == before[:offset]
    assert after[offset + length:10 * MiB] == before[offset + length:10 * MiB]
    assert after[10 * MiB:10 * MiB + len(other)] == other
    assert after[12 * MiB + 3 * 4096:] == before[12 * MiB + 3 * 4096:]


def test_server_close_ends_a_stalled_splice(tmp_path):
    export = FileExport(make_image(tmp_path / "s.img", 8 * MiB), "s")
    st = ServerThread({"s": export})
    sock, _ = raw_connect(st.port, "s")
    try:
        sock.sendall(codec.encode_request(0, Command.WRITE, 1, 0, 4 * MiB) + bytes(MiB))
        wait_for(lambda: st.server.payloads_spliced == 1, "the payload to reach the splicer")
    finally:
        t = time.monotonic()
        st.close()
        export.close()
    assert time.monotonic() - t < 5
    wait_for(lambda: not splice_threads(), "splice threads to exit")
    sock.close()


# ---------------------------------------------------------------- many connections
def test_multi_conn_writers_and_flush(tmp_path, serve):
    size = 64 * MiB
    src = make_image(tmp_path / "src.img", 32 * MiB, seed=9)
    st = serve([FileExport(make_image(tmp_path / "mc.img", size), "mc")])
    copier = subprocess.Popen(["nbdcopy", "--connections=4", src, st.url("mc")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    blobs = [os.urandom(MiB + 513 * i) for i in range(4)]

    async def writer(i: int):
        c = await NBDClient.connect("127.0.0.1", st.port, "mc")
        base = 32 * MiB + i * 8 * MiB
        await asyncio.gather(*(c.write(base + k * 2 * MiB, blobs[i], fua=(k % 3 == 0)) for k in range(4)))
        await c.close()

    async def main():
        await asyncio.gather(*(writer(i) for i in range(4)))
        c = await NBDClient.connect("127.0.0.1", st.port, "mc")
        await c.flush()  # covers what every connection wrote
        for i in range(4):
            base = 32 * MiB + i * 8 * MiB
            for k in range(4):
                assert await c.read(base + k * 2 * MiB, len(blobs[i])) == blobs[i]
        await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
        assert copier.wait(120) == 0, copier.stderr.read()
    finally:
        if copier.poll() is None:
            copier.kill()
            copier.wait()
        copier.stderr.close()
    with open(tmp_path / "mc.img", "rb") as f:
        assert hashlib.sha256(f.read(32 * MiB)).hexdigest() == sha256(src)
    assert st.server.payloads_spliced > 16


def test_tls_connections_do_not_splice_and_still_work(tmp_path, serve, cluster_tls):
    size = 9 * MiB + 17
    src = make_image(tmp_path / "src.img", size, seed=10)
    st = serve([FileExport(make_image(tmp_path / "t.img", size), "t")],
               tls_context=tls.server_context(cluster_tls["dir"]), tls_mode=TLSMode.REQUIRE)
    url = f"nbds://127.0.0.1:{st.port}/t?tls-certificates={cluster_tls['dir']}"
    nbdcopy(src, url)
    nbdcopy(url, str(tmp_path / "back.img"))
    assert sha256(tmp_path / "t.img") == sha256(src) == sha256(tmp_path / "back.img")
    assert st.server.payloads_spliced == 0


def test_fua_flag_without_payload_still_flushes(tmp_path, serve):
    # zero-length FUA WRITE: no splice, the export is flushed as before
    st = serve([FileExport(make_image(tmp_path / "z.img", MiB), "z")])
    sock, _ = raw_connect(st.port, "z")
    with sock:
        assert raw_write(sock, 3, 0, b"", flags=CommandFlag.FUA) == (0, 3)
    assert st.server.payloads_spliced == 0


def test_isu_stops_promptly_with_a_client_stalled_mid_payload(tmp_path, isu_factory):
    isu = isu_factory([f"{tmp_path}/st.img:8M"])
    sock, _ = raw_connect(isu.port, "st")
    with sock:
        assert raw_write(sock, 1, 0, os.urandom(MiB)) == (0, 1)  # spliced by the ISU
        sock.sendall(codec.encode_request(0, Command.WRITE, 2, MiB, 4 * MiB) + bytes(MiB))
        time.sleep(0.3)
        t = time.monotonic()
        stop(isu.proc)
        assert time.monotonic() - t < 5 and isu.proc.returncode != -9, isu.log()[-2000:]
