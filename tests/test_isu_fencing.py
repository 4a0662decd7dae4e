"""Epoch fencing at the ISUs (issue 10, design point 3) and the head's side of it.

Real ISU processes with TLS and role certificates (tests/conftest.py
cluster_tls): the control channel's `fence` is asked with a head's
certificate; NBD connections declare their epoch with Opie's handshake
option (nbd.client, or by hand on a raw socket). What must hold:

- a connection of an epoch below the accepted one is refused with a clear
  reply, and cannot pick an export afterwards;
- `fence(5)` closes a served epoch-3 connection; after the acknowledgement
  nothing it sent lands on the disk and none of its requests succeeds, and
  a new epoch-5 connection is served;
- `fence` from an ISU's certificate, or at a stale epoch, is refused and
  changes nothing (the epoch record byte for byte);
- an ISU restarted after fence(5) refuses epoch 4 at once (persisted);
- a torn or corrupt epoch record refuses the start with a clear error and is
  not reset;
- nbdinfo/nbdcopy (no epoch) read a fenced ISU but cannot write it;
- the splice path (plain TCP, in-process server): a fence aborts a payload
  stalled mid-stream and nothing of it is written afterwards.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import sys
import time
from pathlib import Path

import pytest

from opie.head.ha.fencing import FenceResult, fence_all, member_isus
from opie.head.members import connect_all
from opie.isu import control, fencing
from opie.isu.errors import ControlError, EpochRecordError
from opie.nbd import codec, tls
from opie.nbd.client import NBDClient
from opie.nbd.constants import OPT_OPIE_EPOCH, ClientFlag, Command, Info, Option, Reply
from opie.nbd.errors import EpochRefused
from opie.nbd.export import FileExport
from proc_support import free_port, stop
from test_nbd_splice import make_image, recv_exact, serve, splice_threads, wait_for  # noqa: F401 (fixture)

MiB = 1 << 20
DISK = 8 * MiB


# ---------------------------------------------------------------- helpers
def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def epoch_file(state: Path) -> bytes | None:
    p = state / fencing.FILENAME
    return p.read_bytes() if p.exists() else None


def control_port(isu) -> int:
    return int(isu.ready["control"].rsplit(":", 1)[1])


def fenced_isu(isu_factory, tmp_path: Path, cluster_tls: dict, name: str = "isu"):
    """A real ISU with an ISU certificate, its control channel on 127.0.0.1."""
    return isu_factory([f"{tmp_path}/{name}/disk0.img:8M"], name=name, tls_dir=cluster_tls["isu"],
                       extra=["--announce", "127.0.0.1", "--control-port", "0"])


def raw_handshake(port: int, epoch: int, ctx: ssl.SSLContext | None) -> tuple[socket.socket, tuple[int, bytes]]:
    """Greeting, flags, STARTTLS (with ctx), then OPT_OPIE_EPOCH by hand:
    the socket and the (reply type, message) of the epoch option."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    recv_exact(sock, codec.GREETING_SIZE)
    sock.sendall(codec.encode_client_flags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    if ctx is not None:
        sock.sendall(codec.encode_option(Option.STARTTLS))
        assert option_reply(sock)[0] == Reply.ACK
        sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    sock.sendall(codec.encode_option(OPT_OPIE_EPOCH, codec.encode_epoch(epoch)))
    return sock, option_reply(sock)


def option_reply(sock) -> tuple[int, bytes]:
    hdr = codec.decode_option_reply_header(recv_exact(sock, codec.OPTION_REPLY_SIZE))
    return hdr.reply, recv_exact(sock, hdr.length)


def raw_go(sock, name: str) -> int:
    """NBD_OPT_GO by hand: the final reply type."""
    sock.sendall(codec.encode_option(Option.GO, codec.encode_info_request(name, (Info.BLOCK_SIZE,))))
    while True:
        reply, _ = option_reply(sock)
        if reply != Reply.INFO:
            return reply


# ---------------------------------------------------------------- the record and the gate (no I/O peers)
def test_epoch_record_layout_and_refusals(tmp_path):
    raw = fencing.EpochRecord(5).to_bytes()
    assert len(raw) == fencing.RECORD_SIZE == 24 and raw[:8] == b"OPIEEPOC"
    assert fencing.EpochRecord.from_bytes(raw).epoch == 5
    assert fencing.load(tmp_path) == 0                      # no record: never fenced
    fencing.save(tmp_path, 5)
    assert fencing.load(tmp_path) == 5 and (tmp_path / "epoch").read_bytes() == raw
    flipped = bytearray(raw)
    flipped[19] ^= 1
    for bad, what in ((raw[:13], "torn"), (bytes(flipped), "crc32"), (b"X" + raw[1:], "magic"), (b"", "torn")):
        with pytest.raises(EpochRecordError, match=what):
            fencing.EpochRecord.from_bytes(bad)


def test_gate_admission_rules(tmp_path):
    gate = fencing.EpochGate(tmp_path)
    assert gate.admit(0).refused is None and not gate.admit(0).read_only   # never fenced: as before HA
    assert "fence first" in gate.admit(3).refused
    fencing.save(tmp_path, 5)
    gate = fencing.EpochGate(tmp_path)
    assert gate.admit(5).refused is None and not gate.admit(5).read_only
    assert "stale epoch 4" in gate.admit(4).refused
    assert "not fenced" in gate.admit(6).refused
    assert gate.admit(0).refused is None and gate.admit(0).read_only      # admins read, never write


def test_verifier_hook_refuses_and_changes_nothing(tmp_path):
    """The control op asks `verifier(E)` before fencing; False or an error refuses."""
    from opie.nbd.server import NBDServer
    asked: list[int] = []

    async def scenario():
        server = NBDServer({})
        gate = fencing.EpochGate(tmp_path)

        async def no(epoch):
            asked.append(epoch)
            return False

        async def broken(epoch):
            raise ConnectionError("etcd unreachable")

        async def yes(epoch):
            asked.append(epoch)
            return True

        for verifier, why in ((no, "not the current head"), (broken, "could not be verified")):
            gate.verifier = verifier
            reply = await fencing.answer_fence(gate, server, {"op": "fence", "epoch": 7})
            assert reply["ok"] is False and why in reply["error"]
            assert epoch_file(tmp_path) is None and gate.accepted == 0
        for bad in (True, "7", 0, -1, 1 << 63, None):
            reply = await fencing.answer_fence(gate, server, {"op": "fence", "epoch": bad})
            assert reply["ok"] is False and "epoch" in reply["error"]
        gate.verifier = yes
        assert await fencing.answer_fence(gate, server, {"op": "fence", "epoch": 7}) == \
            {"ok": True, "epoch": 7, "closed": 0}
        assert fencing.load(tmp_path) == 7 and gate.admit(7).refused is None

    asyncio.run(scenario())
    assert asked == [7, 7]


# ---------------------------------------------------------------- a real ISU
def test_stale_and_unfenced_epochs_are_refused_on_the_wire(tmp_path, cluster_tls, isu_factory):
    isu = fenced_isu(isu_factory, tmp_path, cluster_tls)
    head = tls.client_context(cluster_tls["dir"])
    assert asyncio.run(control.fence("127.0.0.1", 5, head, port=control_port(isu))) == 0
    for epoch, why in ((3, b"stale epoch 3"), (7, b"not fenced")):
        sock, (reply, msg) = raw_handshake(isu.port, epoch, head)
        with sock:
            assert reply == Reply.ERR_POLICY and why in msg, msg
            assert raw_go(sock, "disk0") == Reply.ERR_POLICY   # no export after a refused epoch
    sock, (reply, _) = raw_handshake(isu.port, 5, head)
    with sock:
        assert reply == Reply.ACK and raw_go(sock, "disk0") == Reply.ACK

    async def clients():
        with pytest.raises(EpochRefused, match="stale epoch 4") as exc:
            await NBDClient.connect("127.0.0.1", isu.port, "disk0", tls_context=head, epoch=4, timeout=5)
        assert exc.value.errno == errno.EPERM
        # the head's member layer: a refused member counts as unreachable
        assert await connect_all([isu.url("disk0", cluster_tls["dir"])], head, epoch=4) == [None]
        members = await connect_all([isu.url("disk0", cluster_tls["dir"])], head, epoch=5)
        assert members[0] is not None
        await members[0].write(0, b"x" * 4096, fua=True)
        assert bytes(await members[0].read(0, 4096)) == b"x" * 4096
        await members[0].close()

    asyncio.run(clients())


def test_fence_closes_older_connections_and_ends_their_requests(tmp_path, cluster_tls, isu_factory):
    isu = fenced_isu(isu_factory, tmp_path, cluster_tls)
    disk = tmp_path / "isu" / "disk0.img"
    head = tls.client_context(cluster_tls["dir"])
    port = control_port(isu)
    block = 64 * 1024

    async def scenario():
        assert await control.fence("127.0.0.1", 3, head, port=port) == 0
        old = await NBDClient.connect("127.0.0.1", isu.port, "disk0", tls_context=head, epoch=3, timeout=5,
                                      reconnect_attempts=1)
        await old.write(0, b"3" * block, fua=True)
        acked_at: list[float] = []
        outcomes: list[tuple[float, float, BaseException | None]] = []   # (issued, done, error)

        async def writer(i: int):
            """Keep writing distinct blocks until a write fails."""
            n = 0
            while True:
                offset = (1 + (i * 61 + n) % 120) * block
                issued = time.monotonic()
                try:
                    await old.write(offset, bytes([i + 1]) * block)
                except OSError as exc:
                    outcomes.append((issued, time.monotonic(), exc))
                    return
                outcomes.append((issued, time.monotonic(), None))
                n += 1

        writers = [asyncio.ensure_future(writer(i)) for i in range(8)]
        while len(outcomes) < 32:                 # the stream is flowing
            await asyncio.sleep(0.01)
        closed = await control.fence("127.0.0.1", 5, head, port=port)
        acked_at.append(time.monotonic())
        on_disk = digest(disk)
        await asyncio.wait_for(asyncio.gather(*writers), 20)   # every writer ends on a failure
        assert closed >= 1
        assert digest(disk) == on_disk, "the fenced connection wrote after the fence was acknowledged"
        succeeded = [done for _, done, e in outcomes if e is None]
        assert len(succeeded) >= 32 and max(succeeded) < acked_at[0], "a request succeeded after the ack"
        assert sum(e is not None for _, _, e in outcomes) == len(writers)
        assert any(isinstance(e, EpochRefused) for _, _, e in outcomes), "the reconnect was not refused"
        with pytest.raises(OSError):
            await old.write(0, b"4" * block)
        await old.close()
        new = await NBDClient.connect("127.0.0.1", isu.port, "disk0", tls_context=head, epoch=5, timeout=5)
        await new.write(0, b"5" * block, fua=True)
        assert bytes(await new.read(0, block)) == b"5" * block
        await new.close()

    asyncio.run(scenario())
    assert json.loads((tmp_path / "isu" / "isu.json").read_text())["uuid"] == isu.uuid
    assert fencing.load(tmp_path / "isu") == 5


def test_fence_needs_a_head_and_a_current_epoch(tmp_path, cluster_tls, isu_factory):
    isu = fenced_isu(isu_factory, tmp_path, cluster_tls)
    state = tmp_path / "isu"
    port = control_port(isu)
    head = tls.client_context(cluster_tls["dir"])
    as_isu = tls.client_context(cluster_tls["isu"])

    async def scenario():
        with pytest.raises(ControlError, match="head's certificate"):
            await control.fence("127.0.0.1", 5, as_isu, port=port)
        assert epoch_file(state) is None
        await control.fence("127.0.0.1", 5, head, port=port)
        before = epoch_file(state)
        assert fencing.EpochRecord.from_bytes(before).epoch == 5
        for ctx, epoch, why in ((as_isu, 9, "head's certificate"), (head, 4, "stale head")):
            with pytest.raises(ControlError, match=why):
                await control.fence("127.0.0.1", epoch, ctx, port=port)
            assert epoch_file(state) == before
        assert await control.fence("127.0.0.1", 5, head, port=port) == 0   # a repeat is harmless
        assert epoch_file(state) == before
        status = await control.call("127.0.0.1", {"op": "status"}, head, port=port)
        assert status["epoch"] == 5

    asyncio.run(scenario())


def test_fence_all_reports_who_acknowledged(tmp_path, cluster_tls, isu_factory):
    a = fenced_isu(isu_factory, tmp_path, cluster_tls, name="a")
    b = fenced_isu(isu_factory, tmp_path, cluster_tls, name="b")
    head = tls.client_context(cluster_tls["dir"])
    dead = f"127.0.0.1:{free_port()}"
    targets = [f"127.0.0.1:{control_port(a)}", f"127.0.0.1:{control_port(b)}", dead]

    async def scenario() -> tuple[FenceResult, FenceResult]:
        first = await fence_all(targets, 6, head, timeout=3)
        again = await fence_all(targets[:2], 5, head, timeout=3)   # a stale head now
        return first, again

    first, again = asyncio.run(scenario())
    assert first.acked == tuple(targets[:2]) and list(first.failed) == [dead]
    assert first.quorum(3) and not first.quorum(2 + 2)
    assert again.acked == () and all("stale head" in why for why in again.failed.values())
    assert member_isus(["nbds://10.0.0.1:10809/disk0", "nbds://10.0.0.1:10809/disk1",
                        "nbds://10.0.0.2:10809/disk0"]) == ["10.0.0.1", "10.0.0.2"]


def test_restarted_isu_keeps_its_epoch(tmp_path, cluster_tls, isu_factory):
    state = tmp_path / "isu"
    isu = fenced_isu(isu_factory, tmp_path, cluster_tls)
    head = tls.client_context(cluster_tls["dir"])
    asyncio.run(control.fence("127.0.0.1", 5, head, port=control_port(isu)))
    stop(isu.proc)
    again = fenced_isu(isu_factory, tmp_path, cluster_tls)
    assert again.ready["epoch"] == 5

    async def clients():
        with pytest.raises(EpochRefused, match="stale epoch 4"):
            await NBDClient.connect("127.0.0.1", again.port, "disk0", tls_context=head, epoch=4, timeout=5)
        c = await NBDClient.connect("127.0.0.1", again.port, "disk0", tls_context=head, epoch=5, timeout=5)
        await c.close()

    asyncio.run(clients())
    assert fencing.load(state) == 5


@pytest.mark.parametrize("damage", ["torn", "corrupt"])
def test_damaged_epoch_record_refuses_the_start(tmp_path, damage):
    state = tmp_path / "isu"
    state.mkdir()
    raw = fencing.EpochRecord(5).to_bytes()
    bad = raw[:10] if damage == "torn" else raw[:12] + b"\x00" * 7 + b"\x09" + raw[20:]
    (state / fencing.FILENAME).write_bytes(bad)
    res = subprocess.run([sys.executable, "-m", "opie.cli.main", "isu", "serve", "--listen", "127.0.0.1:0",
                          "--state-dir", str(state), "--disk", f"{tmp_path}/d.img:4M"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "epoch" in res.stderr and "refusing to serve" in res.stderr, res.stderr
    assert '"ready"' not in res.stdout
    assert (state / fencing.FILENAME).read_bytes() == bad    # not reset to 0


def test_admin_tools_read_a_fenced_isu_but_cannot_write(tmp_path, cluster_tls, isu_factory):
    isu = fenced_isu(isu_factory, tmp_path, cluster_tls)
    head = tls.client_context(cluster_tls["dir"])
    url = isu.url("disk0", cluster_tls["dir"])
    info = json.loads(subprocess.run(["nbdinfo", "--json", url], capture_output=True, text=True,
                                     timeout=60, check=True).stdout)
    assert info["exports"][0]["is_read_only"] is False     # never fenced: as before HA
    asyncio.run(control.fence("127.0.0.1", 2, head, port=control_port(isu)))
    info = json.loads(subprocess.run(["nbdinfo", "--json", url], capture_output=True, text=True,
                                     timeout=60, check=True).stdout)
    assert info["exports"][0]["is_read_only"] is True
    out = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", url, str(out)], check=True, timeout=60, capture_output=True)
    assert out.read_bytes() == (tmp_path / "isu" / "disk0.img").read_bytes()
    src = make_image(tmp_path / "src.img", DISK, seed=3)
    res = subprocess.run(["nbdcopy", src, url], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert (tmp_path / "isu" / "disk0.img").read_bytes() == bytes(DISK)


# ---------------------------------------------------------------- the splice path (plain TCP, in process)
def test_fence_aborts_a_spliced_payload_stalled_midway(tmp_path, serve):  # noqa: F811 (fixture)
    image = make_image(tmp_path / "s.img", 16 * MiB)
    gate = fencing.EpochGate(tmp_path / "state")
    st = serve([FileExport(image, "s")], epoch_gate=gate)
    st.call(gate.fence(3, st.server))
    sock, (reply, _) = raw_handshake(st.port, 3, None)
    with sock:
        assert reply == Reply.ACK and raw_go(sock, "s") == Reply.ACK
        sent = 1 * MiB
        sock.sendall(codec.encode_request(0, Command.WRITE, 1, 0, 8 * MiB) + b"\xab" * sent)
        wait_for(lambda: st.server.payloads_spliced >= 1, "the payload to reach the splicer")
        wait_for(lambda: Path(image).read_bytes()[:sent] == b"\xab" * sent, "the sent part to land")
        started = time.monotonic()
        assert st.call(gate.fence(5, st.server)) == 1
        assert time.monotonic() - started < fencing.DRAIN_SECS, "a stalled payload held up the fence"
        after = digest(image)
        try:
            sock.sendall(b"\xcd" * (7 * MiB))
            assert sock.recv(1) == b""                      # the server closed the connection
        except OSError:
            pass
    wait_for(lambda: not splice_threads(), "the splicer's thread to stop")
    assert digest(image) == after
    data = Path(image).read_bytes()
    assert b"\xcd" not in data and data[sent:] == bytes(16 * MiB - sent)
    assert fencing.load(tmp_path / "state") == 5


def test_a_cancelled_splice_stops_writing_while_the_client_keeps_sending(tmp_path):
    """The splicer, alone: a client that keeps the socket full never lets the
    thread wait on its wake-up, yet once the cancelled `run` returns nothing
    more reaches the file (what a fence relies on)."""
    from opie.nbd import splice
    a, b = socket.socketpair()
    target = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    stop_sending = threading.Event()

    def keep_sending():
        chunk = b"\xab" * (256 * 1024)
        try:
            while not stop_sending.is_set():
                b.sendall(chunk)
        except OSError:
            pass

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()

    async def scenario() -> int:
        splicer = splice.PayloadSplicer(a.fileno(), "test")
        task = asyncio.ensure_future(splicer.run(splicer.receive, target, 0, b"", 1 << 40, False))
        deadline = time.monotonic() + 10
        while os.fstat(target).st_size < 4 * MiB:
            assert time.monotonic() < deadline and not task.done(), "nothing spliced"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return os.fstat(target).st_size

    try:
        size = asyncio.run(scenario())
        grew = []
        for _ in range(5):          # the sender is still sending: the file must not grow (observed 0.1 s)
            grew.append(os.fstat(target).st_size)
            time.sleep(0.02)
        assert set(grew) == {size}, f"{size} bytes at cancellation, then {grew}"
    finally:
        stop_sending.set()
        a.close()
        sender.join(10)
        b.close()
        os.close(target)
