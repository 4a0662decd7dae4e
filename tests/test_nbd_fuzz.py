"""Hostile clients against a live ISU (issue 2, "Bad input").

Raw sockets speak broken NBD at a real `opie isu serve` process: malformed
handshakes, unknown and oversized options, inconsistent INFO/GO data, forced
TLS, out-of-range and unknown requests, stream desynchronisation, and abrupt
disconnects at every step. Each gets the spec's error (doc/proto.md) or a
clean disconnect. After each hostile session `Served.healthy()` checks that

  (a) a client connected before the fuzzing is still served correctly, and a
      new client can connect and read;
  (b) the ISU's backing file equals a reference bytearray that is updated
      only by requests the server acknowledged: nothing was written outside
      a request's range, and refused or truncated requests wrote nothing.

Every socket operation has a timeout; no test can hang.
"""
from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opie.nbd import codec, tls
from opie.nbd.client import NBDClient
from opie.nbd.constants import (
    MAX_NAME_LENGTH,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    ReplyFlag,
    TransmissionFlag,
)
from opie.nbd.server import MAX_OPTION_DISCARD

HOST = "127.0.0.1"
IO_TIMEOUT = 5.0
EXPORT, SIZE = "fz", 4 << 20
OTHER, OTHER_SIZE = "other", 1 << 20
FIXED = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
HANDLED_OPTIONS = {Option.EXPORT_NAME, Option.ABORT, Option.LIST, Option.STARTTLS, Option.INFO, Option.GO,
                   Option.STRUCTURED_REPLY}
SERVED = (Command.READ, Command.WRITE, Command.FLUSH, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES)
KNOWN_FLAGS = int(CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.DF)  # int: ~ of an IntFlag drops undefined bits

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


# ---------------------------------------------------------------- raw client
class Closed(Exception):
    """The server closed the connection."""


class Wire:
    """One raw client connection. Every call is bounded by IO_TIMEOUT."""

    def __init__(self, port: int):
        self.sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.partial: dict[int, dict] = {}
        self.structured = False

    # -- bytes
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def wait_closed(self, timeout: float = IO_TIMEOUT) -> bytes:
        """Read until the server closes; return what it sent before closing.
        Fails if the server keeps the connection open for `timeout`."""
        deadline = time.monotonic() + timeout
        got = bytearray()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"server kept the connection open (sent {bytes(got[:64])!r})")
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(1 << 16)
                except (ConnectionResetError, ssl.SSLError):
                    return bytes(got)
                except socket.timeout:
                    continue
                if not chunk:
                    return bytes(got)
                got += chunk
        finally:
            self.sock.settimeout(IO_TIMEOUT)

    def close(self, rst: bool = False) -> None:
        if rst:  # SO_LINGER 0: the close sends RST, dropping whatever is unsent
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    # -- handshake
    def start(self, flags: int = FIXED) -> None:
        hflags = codec.decode_greeting(self.recv_exact(codec.GREETING_SIZE))
        assert hflags == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self.send(codec.encode_client_flags(flags))

    def option(self, option: int, data: bytes = b"") -> None:
        self.send(codec.encode_option(option, data))

    def reply(self, option: int) -> tuple[int, bytes]:
        hdr = codec.decode_option_reply_header(self.recv_exact(codec.OPTION_REPLY_SIZE))
        assert hdr.option == option, f"reply names option {hdr.option}, expected {option}"
        return hdr.reply, self.recv_exact(hdr.length)

    def replies(self, option: int) -> list[tuple[int, bytes]]:
        """All replies to one option, up to and including the final one."""
        out = []
        while True:
            out.append(self.reply(option))
            if out[-1][0] not in (Reply.SERVER, Reply.INFO):
                return out

    def ask(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.option(option, data)
        return self.replies(option)

    def starttls(self, tls_dir: str) -> None:
        assert self.ask(Option.STARTTLS) == [(Reply.ACK, b"")]
        self.sock = tls.client_context(tls_dir).wrap_socket(self.sock, server_hostname=HOST)

    def go(self, name: str = EXPORT, structured: bool = False) -> codec.ExportInfo:
        if structured:
            assert self.ask(Option.STRUCTURED_REPLY) == [(Reply.ACK, b"")]
        replies = self.ask(Option.GO, codec.encode_info_request(name, (Info.BLOCK_SIZE,)))
        assert replies[-1] == (Reply.ACK, b""), replies
        info = codec.ExportInfo()
        for kind, data in replies[:-1]:
            codec.decode_info_reply(data, info)
        self.structured = structured
        return info

    # -- transmission
    def request(self, type_: int, offset: int, length: int, flags: int = 0, cookie: int = 0,
                payload: bytes = b"") -> None:
        self.send(codec.encode_request(flags, type_, cookie, offset, length) + payload)

    def reply_to(self, pending: dict[int, tuple[int, int, int]]) -> tuple[int, int, bytes]:
        """Read replies until one request's reply is complete; return its
        (cookie, error, read data). `pending` maps cookie -> (type, offset,
        length) of every request still waiting; the reply's cookie must be
        one of them."""
        while True:
            first = self.recv_exact(4)
            hdr = codec.decode_reply_header(first + self.recv_exact(codec.reply_header_size(first) - 4))
            assert hdr.cookie in pending, f"reply for cookie {hdr.cookie:#x} that is not pending"
            type_, offset, length = pending[hdr.cookie]
            if not hdr.structured:
                # the spec: with structured replies, a READ never gets a simple reply
                assert not (self.structured and type_ == Command.READ), "simple reply to a structured READ"
                data = b""
                if type_ == Command.READ and hdr.error == 0:
                    data = self.recv_exact(length)
                return hdr.cookie, hdr.error, data
            assert self.structured, "structured reply that was never negotiated"
            payload = self.recv_exact(hdr.length)
            st_ = self.partial.setdefault(hdr.cookie, {"error": 0, "buf": bytearray(length), "covered": 0})
            if hdr.type == ChunkType.OFFSET_DATA:
                (off,) = struct.unpack_from(">Q", payload)
                data = payload[8:]
                assert type_ == Command.READ and offset <= off and off + len(data) <= offset + length
                st_["buf"][off - offset:off - offset + len(data)] = data
                st_["covered"] += len(data)
            elif hdr.type == ChunkType.OFFSET_HOLE:
                off, n = struct.unpack(">QI", payload)
                assert type_ == Command.READ and offset <= off and off + n <= offset + length
                st_["covered"] += n
            elif hdr.type in (ChunkType.ERROR, ChunkType.ERROR_OFFSET):
                st_["error"] = codec.decode_error_chunk(payload)[0]
                assert st_["error"] != 0, "error chunk with error 0"
            else:
                assert hdr.type == ChunkType.NONE and hdr.length == 0, f"unexpected chunk {hdr}"
            if hdr.flags & ReplyFlag.DONE:
                del self.partial[hdr.cookie]
                if st_["error"] == 0 and type_ == Command.READ:
                    assert st_["covered"] == length, "structured READ reply does not cover the request"
                ok_read = st_["error"] == 0 and type_ == Command.READ
                return hdr.cookie, st_["error"], bytes(st_["buf"]) if ok_read else b""

    def call(self, type_: int, offset: int, length: int, flags: int = 0, payload: bytes = b"",
             cookie: int | None = None) -> tuple[int, bytes]:
        cookie = random.getrandbits(64) if cookie is None else cookie
        self.request(type_, offset, length, flags, cookie, payload)
        got, err, data = self.reply_to({cookie: (type_, offset, length)})
        assert got == cookie
        return err, data


# ---------------------------------------------------------------- the served ISU
class Disk:
    """The reference copy of a served file: what it must hold."""

    def __init__(self, path: str, size: int):
        self.path, self.expected = path, bytearray(size)

    def write(self, offset: int, data: bytes) -> None:
        self.expected[offset:offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.expected[offset:offset + length] = bytes(length)

    def verify(self) -> None:
        with open(self.path, "rb") as f:
            actual = f.read()
        assert len(actual) == len(self.expected), f"{self.path} is {len(actual)} bytes, not {len(self.expected)}"
        if actual != self.expected:
            first = next(i for i in range(len(actual)) if actual[i] != self.expected[i])
            raise AssertionError(f"{self.path} differs from the reference at byte {first}")


class Served:
    """An ISU serving `fz` (modelled) and `other` (must stay untouched), with
    a bystander connection opened before any hostile client."""

    def __init__(self, isu, tmp_path, tls_dir: str | None = None):
        self.isu, self.tls_dir, self.port = isu, tls_dir, isu.port
        self.disk = Disk(str(tmp_path / "fz.img"), SIZE)
        self.other = Disk(str(tmp_path / "other.img"), OTHER_SIZE)
        self.rng = random.Random(2)
        self.bystander = self.connect()
        self.healthy()

    def connect(self, structured: bool = False) -> Wire:
        w = Wire(self.port)
        w.start()
        if self.tls_dir:
            w.starttls(self.tls_dir)
        info = w.go(EXPORT, structured)
        assert info.size == SIZE
        # the spec: SEND_DF MUST be clear unless structured replies were negotiated
        assert bool(info.flags & TransmissionFlag.SEND_DF) == structured
        return w

    def wire(self) -> Wire:
        """A fresh connection that has exchanged greeting and client flags."""
        w = Wire(self.port)
        w.start()
        return w

    def apply(self, type_: int, flags: int, offset: int, length: int, payload: bytes) -> None:
        """Record the effect of a request the server acknowledged."""
        if type_ == Command.WRITE:
            self.disk.write(offset, payload)
        elif type_ in (Command.TRIM, Command.WRITE_ZEROES):
            # FileExport punches a hole or zeroes: both read back as zeroes
            self.disk.zero(offset, length)

    def healthy(self) -> None:
        assert self.isu.proc.poll() is None, "the ISU died"
        # (a) the bystander connection: write somewhere, read back, read elsewhere
        off = self.rng.randrange(0, SIZE - 4096)
        data = self.rng.randbytes(self.rng.randrange(1, 4096))
        assert self.bystander.call(Command.WRITE, off, len(data), payload=data) == (0, b"")
        self.disk.write(off, data)
        roff = self.rng.randrange(0, SIZE - 65536)
        assert self.bystander.call(Command.READ, roff, 65536) == (0, bytes(self.disk.expected[roff:roff + 65536]))
        assert self.bystander.call(Command.READ, off, len(data)) == (0, data)
        # ... and a new client, through the project's own NBD client
        roff = self.rng.randrange(0, SIZE - 4096)
        assert asyncio.run(self._client_read(roff, 4096)) == bytes(self.disk.expected[roff:roff + 4096])
        # (b) the files hold exactly what acknowledged requests put there
        self.disk.verify()
        self.other.verify()
        log = self.isu.log()
        for bad in ("unexpected error", "Traceback", "request handler failed"):
            assert bad not in log, f"ISU log shows {bad!r}:\n{log[-3000:]}"

    async def _client_read(self, offset: int, length: int) -> bytes:
        async def go():
            c = await NBDClient.connect(HOST, self.port, EXPORT, tls_dir=self.tls_dir, timeout=IO_TIMEOUT)
            try:
                return await c.read(offset, length)
            finally:
                await c.close()
        return await asyncio.wait_for(go(), 2 * IO_TIMEOUT)


@pytest.fixture
def served(tmp_path, isu_factory):
    isu = isu_factory([f"{tmp_path}/fz.img:4M", f"{tmp_path}/other.img:1M"])
    s = Served(isu, tmp_path)
    yield s
    s.bystander.close()


@pytest.fixture
def served_tls(tmp_path, isu_factory, cluster_tls):
    isu = isu_factory([f"{tmp_path}/fz.img:4M", f"{tmp_path}/other.img:1M"], tls_dir=cluster_tls["dir"])
    s = Served(isu, tmp_path, tls_dir=cluster_tls["dir"])
    yield s
    s.bystander.close()


def expect_closed(w: Wire, what: str) -> None:
    """The server ends the session without sending a single byte more."""
    got = w.wait_closed()
    assert got == b"", f"{what}: server sent {got[:64]!r} instead of closing"
    w.close()


# ---------------------------------------------------------------- malformed handshakes
def _flags(value):
    def run(s: Served) -> Wire:
        w = Wire(s.port)
        w.start(flags=value)
        return w
    return run


def _after_flags(raw: bytes, half_close: bool = False):
    def run(s: Served) -> Wire:
        w = s.wire()
        w.send(raw)
        if half_close:
            w.sock.shutdown(socket.SHUT_WR)
        return w
    return run


MALFORMED_HANDSHAKES = {
    # the spec: the server MUST drop the connection on unknown client flags
    "unknown client flag bit 2": _flags(FIXED | 1 << 2),
    "unknown client flag bit 31": _flags(ClientFlag.FIXED_NEWSTYLE | 1 << 31),
    # our policy (server docstring): only fixed newstyle clients are served
    "no fixed newstyle": _flags(0),
    "NO_ZEROES without fixed newstyle": _flags(ClientFlag.NO_ZEROES),
    "bad option magic": _after_flags(b"IHAVEOPX" + struct.pack(">II", Option.LIST, 0)),
    "oldstyle-looking garbage": _after_flags(b"\x00\x42\x02\x81\x86\x12\x53\x00" + bytes(8)),
    "truncated option header": _after_flags(b"IHAVEOPT\x00\x00", half_close=True),
    "option data cut short": _after_flags(codec.encode_option(Option.LIST, bytes(100))[:40], half_close=True),
    # NBD_OPT_EXPORT_NAME cannot carry an error: the server MUST terminate
    "EXPORT_NAME of an unknown export": _after_flags(codec.encode_option(Option.EXPORT_NAME, b"nosuch")),
    "EXPORT_NAME longer than 4096 bytes": _after_flags(
        codec.encode_option(Option.EXPORT_NAME, b"f" * (MAX_NAME_LENGTH + 1))),
    "EXPORT_NAME not UTF-8": _after_flags(codec.encode_option(Option.EXPORT_NAME, b"f\xff\xfe")),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_HANDSHAKES))
def test_malformed_handshake_is_disconnected(served, case):
    expect_closed(MALFORMED_HANDSHAKES[case](served), case)
    served.healthy()


def test_client_flags_cut_short_then_eof(served):
    w = Wire(served.port)
    codec.decode_greeting(w.recv_exact(codec.GREETING_SIZE))
    w.send(b"\x00\x00")
    w.sock.shutdown(socket.SHUT_WR)
    expect_closed(w, "two bytes of client flags")
    served.healthy()


def handshake_script() -> tuple[bytes, list[int]]:
    """A client's whole side of a handshake plus one WRITE whose payload never
    completes, and the offsets where each message starts."""
    parts = [
        codec.encode_client_flags(FIXED),
        codec.encode_option(Option.STRUCTURED_REPLY),
        codec.encode_option(Option.LIST),
        codec.encode_option(0x4242, b"unknown"),
        codec.encode_option(Option.INFO, codec.encode_info_request(EXPORT, (Info.NAME, Info.BLOCK_SIZE))),
        codec.encode_option(Option.GO, codec.encode_info_request(EXPORT)),
        codec.encode_request(0, Command.WRITE, 1, 4096, 512) + b"\xee" * 511,  # one byte short
    ]
    starts, pos = [], 0
    for p in parts:
        starts.append(pos)
        pos += len(p)
    return b"".join(parts), starts


def test_abrupt_disconnect_at_every_handshake_step(served):
    """Cut the connection after every byte of a handshake (FIN or RST, reading
    nothing), then once more inside the first request's payload."""
    script, starts = handshake_script()
    cuts = list(range(0, starts[-1] + codec.REQUEST_SIZE + 1)) + list(range(starts[-1] + 40, len(script) + 1, 97))
    for i, cut in enumerate(cuts):
        w = Wire(served.port)
        if i % 3 == 0:
            w.recv_exact(codec.GREETING_SIZE)  # sometimes read the greeting first
        if cut:
            w.send(script[:cut])
        w.close(rst=i % 2 == 0)
    served.healthy()


# ---------------------------------------------------------------- options
unknown_options = st.one_of(st.sampled_from([0, Option.PEEK_EXPORT, Option.LIST_META_CONTEXT,
                                             Option.SET_META_CONTEXT, Option.EXTENDED_HEADERS, 12, 2**31]),
                            u32).filter(lambda o: o not in HANDLED_OPTIONS)


@FUZZ
@given(st.lists(st.tuples(unknown_options, st.binary(max_size=300)), min_size=1, max_size=4))
def test_unknown_options_get_unsup_and_the_session_stays_usable(served, options):
    w = served.wire()
    for option, data in options:
        replies = w.ask(option, data)
        assert [r for r, _ in replies] == [Reply.ERR_UNSUP], (option, replies)
    w.go()
    off = random.randrange(SIZE - 512)
    assert w.call(Command.READ, off, 512) == (0, bytes(served.disk.expected[off:off + 512]))
    w.request(Command.DISC, 0, 0)
    expect_closed(w, "NBD_CMD_DISC")
    served.healthy()


def test_option_refusals_keep_the_session_usable(served):
    """Table of options the server must refuse with a given error; all on one
    connection, which then still negotiates and serves."""
    w = served.wire()
    table = [
        # the spec: LIST and STRUCTURED_REPLY take no data -> ERR_INVALID
        (Option.LIST, b"x", Reply.ERR_INVALID),
        (Option.STRUCTURED_REPLY, b"\x00", Reply.ERR_INVALID),
        # NOTLS server: STARTTLS -> ERR_POLICY (never ERR_TLS_REQD)
        (Option.STARTTLS, b"", Reply.ERR_POLICY),
        # unknown export -> ERR_UNKNOWN, with no NBD_REP_INFO before it
        (Option.INFO, codec.encode_info_request("nosuch"), Reply.ERR_UNKNOWN),
        (Option.GO, codec.encode_info_request("nosuch", (Info.BLOCK_SIZE,)), Reply.ERR_UNKNOWN),
        (Option.INFO, codec.encode_info_request("FZ"), Reply.ERR_UNKNOWN),  # names are exact
        # INFO/GO whose lengths do not add up -> ERR_INVALID
        (Option.INFO, b"", Reply.ERR_INVALID),
        (Option.INFO, b"\x00\x00\x00\x02fz\x00", Reply.ERR_INVALID),
        (Option.GO, b"\x00\x00\x00\x03fz\x00\x00", Reply.ERR_INVALID),
        (Option.GO, b"\x00\x00\x00\x01fz\x00\x00", Reply.ERR_INVALID),
        (Option.INFO, b"\x00\x00\x00\x02fz\x00\x02\x00\x03", Reply.ERR_INVALID),
        (Option.GO, b"\x00\x00\x00\x02fz\x00\x00\x00\x03", Reply.ERR_INVALID),
        (Option.GO, b"\xff\xff\xff\xfffz\x00\x00", Reply.ERR_INVALID),
        (Option.GO, struct.pack(">I", 4097) + b"f" * 4097 + b"\x00\x00", Reply.ERR_INVALID),
        (Option.INFO, b"\x00\x00\x00\x02\xff\xfe\x00\x00", Reply.ERR_INVALID),
    ]
    for option, data, want in table:
        replies = w.ask(option, data)
        assert [r for r, _ in replies] == [want], (option, data[:20], replies)
    # one more: a second STRUCTURED_REPLY is refused (the spec allows
    # ERR_INVALID for repeated state-changing options)
    assert w.ask(Option.STRUCTURED_REPLY) == [(Reply.ACK, b"")]
    assert [r for r, _ in w.ask(Option.STRUCTURED_REPLY)] == [Reply.ERR_INVALID]
    # the same connection still lists, describes and serves
    listed = w.ask(Option.LIST)
    assert [r for r, _ in listed] == [Reply.SERVER, Reply.SERVER, Reply.ACK]
    assert {codec.decode_server_entry(d)[0] for _, d in listed[:-1]} == {EXPORT, OTHER}
    info = w.ask(Option.INFO, codec.encode_info_request(EXPORT, (Info.NAME, Info.NAME, 0x7777)))
    assert info[-1] == (Reply.ACK, b"") and len(info) >= 2
    w.go()
    w.structured = True  # negotiated above
    assert w.call(Command.READ, 0, 4096) == (0, bytes(served.disk.expected[:4096]))
    w.close()
    served.healthy()


def test_abort_with_data_is_acknowledged_then_closed(served):
    # the spec: the server SHOULD ignore data sent with NBD_OPT_ABORT, MUST ACK
    w = served.wire()
    w.option(Option.ABORT, b"ignored")
    assert w.reply(Option.ABORT) == (Reply.ACK, b"")
    expect_closed(w, "after NBD_OPT_ABORT")
    served.healthy()


def spec_info_outcome(data: bytes) -> str:
    """What INFO/GO data means, parsed straight from the spec's layout:
    u32 name length (<= data length - 6), name, u16 n, n x u16."""
    if len(data) < 6:
        return "invalid"
    (n,) = struct.unpack_from(">I", data)
    if n > len(data) - 6 or n > MAX_NAME_LENGTH:
        return "invalid"
    (count,) = struct.unpack_from(">H", data, 4 + n)
    if len(data) != 4 + n + 2 + 2 * count:
        return "invalid"
    try:
        name = data[4:4 + n].decode("utf-8")
    except UnicodeDecodeError:
        return "invalid"
    return "known" if name in (EXPORT, OTHER) else "unknown"


info_data = st.one_of(
    st.binary(max_size=64),
    # near-valid: a real or made-up name with lying length fields
    st.builds(lambda name, dn, reqs, dc, tail: struct.pack(">I", max(0, len(name) + dn)) + name
              + struct.pack(">H", max(0, len(reqs) + dc)) + b"".join(struct.pack(">H", r) for r in reqs) + tail,
              st.sampled_from([b"fz", b"other", b"", b"nosuch", b"f\xff"]), st.integers(-3, 3),
              st.lists(st.integers(0, 5), max_size=3), st.integers(-2, 2), st.binary(max_size=3)),
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([Option.INFO, Option.GO]), info_data), min_size=1, max_size=6))
def test_info_and_go_with_hostile_data(served, requests):
    """Inconsistent lengths -> ERR_INVALID; unknown name -> ERR_UNKNOWN with no
    NBD_REP_INFO; a well-formed request for a real export succeeds."""
    w = served.wire()
    for option, data in requests:
        want = spec_info_outcome(data)
        replies = w.ask(option, data)
        kinds = [r for r, _ in replies]
        if want == "invalid":
            assert kinds == [Reply.ERR_INVALID], (data, replies)
        elif want == "unknown":
            assert kinds == [Reply.ERR_UNKNOWN], (data, replies)
        else:
            assert kinds[-1] == Reply.ACK and Reply.INFO in kinds, (data, replies)
            if option == Option.GO:  # now in transmission: leave cleanly
                w.request(Command.DISC, 0, 0)
                break
    w.close()
    served.healthy()


@pytest.mark.parametrize("option, length, send_data, outcome", [
    # over MAX_OPTION_LENGTH but small enough to skip: the data is read and
    # discarded, the reply is ERR_TOO_BIG and the session goes on
    (Option.LIST, MAX_OPTION_LENGTH + 1, True, Reply.ERR_TOO_BIG),
    (Option.INFO, MAX_OPTION_DISCARD, True, Reply.ERR_TOO_BIG),
    (0x4242, MAX_OPTION_LENGTH + 1, True, Reply.ERR_TOO_BIG),
    # too long to skip: a clean disconnect, without waiting for the data
    (Option.GO, MAX_OPTION_DISCARD + 1, False, "closed"),
    (Option.LIST, 2**32 - 1, False, "closed"),
    # EXPORT_NAME cannot carry an error, so anything over the limit closes
    (Option.EXPORT_NAME, MAX_OPTION_LENGTH + 1, False, "closed"),
])
def test_oversized_option_lengths(served, option, length, send_data, outcome):
    w = served.wire()
    w.send(struct.pack(">QII", codec.IHAVEOPT, option, length))
    if send_data:
        w.send(os.urandom(length))
    if outcome == "closed":
        expect_closed(w, f"option {option} with {length} bytes")
    else:
        assert [r for r, _ in w.replies(option)] == [outcome]
        w.go()
        assert w.call(Command.READ, 0, 512) == (0, bytes(served.disk.expected[:512]))
        w.close()
    served.healthy()


# ---------------------------------------------------------------- forced TLS
pre_tls_options = st.one_of(st.sampled_from(sorted(set(range(0, 13)) - {Option.EXPORT_NAME, Option.ABORT,
                                                                       Option.STARTTLS})),
                            u32.filter(lambda o: o not in (Option.EXPORT_NAME, Option.ABORT, Option.STARTTLS)))


def _secrets(s: Served) -> list[bytes]:
    return [EXPORT.encode(), OTHER.encode(), s.disk.path.encode(), b"ISU disk", struct.pack(">Q", SIZE)]


@FUZZ
@given(st.lists(st.tuples(pre_tls_options,
                          st.one_of(st.binary(max_size=200),
                                    st.sampled_from([codec.encode_info_request(EXPORT, (Info.NAME,)),
                                                     codec.encode_info_request(OTHER),
                                                     codec.encode_info_request("")]))),
                min_size=1, max_size=6))
def test_forced_tls_refuses_every_option_and_leaks_nothing(served_tls, options):
    """FORCEDTLS: before STARTTLS every option but STARTTLS and ABORT is
    answered NBD_REP_ERR_TLS_REQD (INFO/GO with no NBD_REP_INFO), and no
    export name, path or size appears in anything the server sends."""
    s = served_tls
    w = s.wire()
    seen = bytearray()
    for option, data in options:
        replies = w.ask(option, data)
        assert [r for r, _ in replies] == [Reply.ERR_TLS_REQD], (option, replies)
        seen += b"".join(d for _, d in replies)
    for secret in _secrets(s):
        assert secret not in seen
    # after STARTTLS the same connection may learn everything (the check can fail)
    w.starttls(s.tls_dir)
    listed = w.ask(Option.LIST)
    assert {codec.decode_server_entry(d)[0] for r, d in listed if r == Reply.SERVER} == {EXPORT, OTHER}
    assert [r for r, _ in w.ask(Option.STARTTLS)] == [Reply.ERR_INVALID]  # TLS already negotiated
    w.go()
    assert w.call(Command.READ, 8192, 512) == (0, bytes(s.disk.expected[8192:8704]))
    w.close()
    s.healthy()


def test_forced_tls_handshake_abuse(served_tls):
    s = served_tls
    # EXPORT_NAME before STARTTLS: the server MUST terminate, revealing nothing
    w = s.wire()
    w.option(Option.EXPORT_NAME, EXPORT.encode())
    expect_closed(w, "EXPORT_NAME before STARTTLS")
    # STARTTLS with data is invalid; the session can still upgrade afterwards
    w = s.wire()
    assert [r for r, _ in w.ask(Option.STARTTLS, b"x")] == [Reply.ERR_INVALID]
    w.starttls(s.tls_dir)
    w.close()
    # garbage instead of a TLS ClientHello after the ACK: the server closes
    w = s.wire()
    assert w.ask(Option.STARTTLS) == [(Reply.ACK, b"")]
    w.send(b"\x16\x03\x01\x00\x05hello" + os.urandom(64))
    w.wait_closed()
    w.close()
    # a plain-text client that gives up with ABORT gets its ACK
    w = s.wire()
    w.option(Option.ABORT)
    assert w.reply(Option.ABORT) == (Reply.ACK, b"")
    expect_closed(w, "ABORT")
    # TLS without a client certificate (CA only): refused at the TLS layer
    w = s.wire()
    assert w.ask(Option.STARTTLS) == [(Reply.ACK, b"")]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(s.tls_dir, "ca-cert.pem"))
    try:
        w.sock = ctx.wrap_socket(w.sock, server_hostname=HOST)
        w.option(Option.LIST)  # TLS 1.3 reports the refused certificate on first use
        got = w.wait_closed()
        assert EXPORT.encode() not in got
    except (ssl.SSLError, ConnectionError):
        pass
    w.close()
    s.healthy()


# ---------------------------------------------------------------- transmission
E = Errno
REFUSED_REQUESTS = [
    # (type, flags, offset, length, send payload, errno); the spec: EINVAL for
    # a read/trim beyond the end, ENOSPC for a write/write-zeroes beyond it,
    # EINVAL for unknown commands and flags
    (Command.READ, 0, SIZE, 1, False, E.EINVAL),
    (Command.READ, 0, SIZE - 1, 2, False, E.EINVAL),
    (Command.READ, 0, 2**64 - 1, 1, False, E.EINVAL),
    (Command.READ, 0, 2**64 - 512, 1024, False, E.EINVAL),  # would wrap in 64 bits
    (Command.TRIM, 0, SIZE - 4096, 8192, False, E.EINVAL),
    (Command.CACHE, 0, SIZE, 1, False, E.EINVAL),
    (Command.WRITE, 0, SIZE - 1, 2, True, E.ENOSPC),
    (Command.WRITE, 0, 2**64 - 16, 16, True, E.ENOSPC),
    (Command.WRITE, CommandFlag.FUA, SIZE, 512, True, E.ENOSPC),
    (Command.WRITE_ZEROES, 0, SIZE, 1, False, E.ENOSPC),
    (Command.WRITE_ZEROES, 0, 0, SIZE + 1, False, E.ENOSPC),
    (Command.READ, 0, 0, MAX_PAYLOAD + 1, False, E.EINVAL),  # longer than the advertised maximum
    (Command.BLOCK_STATUS, 0, 0, 512, False, E.EINVAL),  # never negotiated
    (Command.RESIZE, 0, 0, 0, False, E.EINVAL),
    (9, 0, 0, 512, False, E.EINVAL),
    (0x7FFF, 0, 0, 0, False, E.EINVAL),
    (0xFFFF, CommandFlag.FUA, 0, 512, False, E.EINVAL),
    (Command.READ, 1 << 5, 0, 512, False, E.EINVAL),  # unknown flag bits
    (Command.READ, 1 << 15, 0, 512, False, E.EINVAL),
    (Command.WRITE, 1 << 9, 0, 512, True, E.EINVAL),  # payload still consumed
    (Command.WRITE_ZEROES, CommandFlag.FAST_ZERO, 0, 512, False, E.EINVAL),  # SEND_FAST_ZERO not offered
    (Command.WRITE, CommandFlag.NO_HOLE, 0, 512, True, E.EINVAL),  # NO_HOLE is for WRITE_ZEROES only
    (Command.TRIM, CommandFlag.DF, 0, 512, False, E.EINVAL),  # DF is for READ only
    (Command.FLUSH, 0, 1, 0, False, E.EINVAL),  # offset and length MUST be zero
    (Command.FLUSH, 0, 0, 1, False, E.EINVAL),
]


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_refused_requests_get_the_spec_errno_and_change_nothing(served, structured):
    w = served.connect(structured)
    table = REFUSED_REQUESTS + [
        # DF without NBD_FLAG_SEND_DF (only offered with structured replies)
        *([] if structured else [(Command.READ, CommandFlag.DF, 0, 512, False, E.EINVAL)]),
    ]
    for type_, flags, offset, length, with_payload, want in table:
        payload = b"\xab" * length if with_payload else b""
        err, data = w.call(type_, offset, length, flags, payload)
        assert (err, data) == (want, b""), (type_, flags, offset, length)
        # the connection stays usable and in step
        off = random.randrange(SIZE - 1024)
        assert w.call(Command.READ, off, 1024) == (0, bytes(served.disk.expected[off:off + 1024]))
    # accepted for contrast: FUA on any command (the spec: the server MUST
    # accept it), DF on a structured READ, zero-length requests at the end
    assert w.call(Command.READ, 0, 16, CommandFlag.FUA) == (0, bytes(served.disk.expected[:16]))
    assert w.call(Command.FLUSH, 0, 0, CommandFlag.FUA) == (0, b"")
    assert w.call(Command.CACHE, 0, SIZE) == (0, b"")
    if structured:
        assert w.call(Command.READ, 512, 512, CommandFlag.DF) == (0, bytes(served.disk.expected[512:1024]))
    assert w.call(Command.WRITE, SIZE, 0) == (0, b"")
    served.healthy()


def spec_errno(type_: int, flags: int, offset: int, length: int, structured: bool) -> int:
    """The error the spec (and the server's documented policy) gives a request."""
    if flags & ~KNOWN_FLAGS or type_ not in SERVED:
        return E.EINVAL
    if flags & CommandFlag.DF and (type_ != Command.READ or not structured):
        return E.EINVAL
    if flags & CommandFlag.NO_HOLE and type_ != Command.WRITE_ZEROES:
        return E.EINVAL
    if type_ == Command.FLUSH:
        return E.EINVAL if offset or length else 0
    if type_ in (Command.READ, Command.WRITE) and length > MAX_PAYLOAD:
        return E.EINVAL
    if offset + length > SIZE:
        return E.ENOSPC if type_ in (Command.WRITE, Command.WRITE_ZEROES) else E.EINVAL
    return 0


request_types = st.one_of(st.sampled_from(SERVED), st.sampled_from(SERVED),
                          u16.filter(lambda t: t != Command.DISC))
request_flags = st.one_of(st.just(0), st.sampled_from([CommandFlag.FUA, CommandFlag.NO_HOLE, CommandFlag.DF,
                                                       CommandFlag.FUA | CommandFlag.NO_HOLE,
                                                       CommandFlag.FAST_ZERO, CommandFlag.REQ_ONE]), u16)
offsets = st.one_of(st.integers(0, SIZE), st.integers(SIZE - 70000, SIZE + 4096), u64)
lengths = st.one_of(st.integers(0, 70000), st.integers(0, 2**32 - 1))


@st.composite
def requests(draw):
    type_, flags, offset, length = draw(request_types), draw(request_flags), draw(offsets), draw(lengths)
    if type_ == Command.WRITE:
        length = min(length, 70000)  # larger than MAX_PAYLOAD closes the stream; tested apart
        offset = min(offset, 2**64 - 1 - length)
    if type_ == Command.READ and spec_errno(type_, flags, offset, length, True) == 0:
        length = min(length, 1 << 20)
    return type_, flags, offset, length, draw(st.integers(0, 2**32))


@FUZZ
@given(st.booleans(), st.lists(requests(), min_size=1, max_size=8))
def test_random_requests_get_the_spec_outcome(served, structured, reqs):
    """Arbitrary requests, one at a time: each gets the spec's errno or
    succeeds; reads return the reference bytes; only acknowledged requests
    change the file, and only inside their range."""
    w = served.connect(structured)
    for type_, flags, offset, length, seed in reqs:
        payload = random.Random(seed).randbytes(length) if type_ == Command.WRITE else b""
        want = spec_errno(type_, flags, offset, length, structured)
        err, data = w.call(type_, offset, length, flags, payload)
        assert err == want, (type_, flags, offset, length, err)
        if want == 0:
            served.apply(type_, flags, offset, length, payload)
            if type_ == Command.READ:
                assert data == bytes(served.disk.expected[offset:offset + length])
        served.disk.verify()
    w.close()
    served.healthy()


SLOT = 64 << 10


@FUZZ
@given(st.booleans(), st.lists(st.tuples(st.integers(0, SIZE // SLOT - 1),
                                         st.sampled_from(["read", "write", "fua-write", "zero", "trim",
                                                          "flush", "beyond", "unknown", "cache"]),
                                         st.integers(1, SLOT), u64, st.integers(0, 2**32)),
                               min_size=2, max_size=24, unique_by=(lambda r: r[0], lambda r: r[3])))
def test_pipelined_requests_each_get_their_own_cookie(served, structured, batch):
    """Up to 24 requests sent in one burst, each in its own 64 KiB slot so
    their effects commute; replies may come in any order, but each cookie
    gets exactly one reply with its own outcome."""
    w = served.connect(structured)
    pending, plan, wire = {}, {}, bytearray()
    for slot, kind, length, cookie, seed in batch:
        offset = slot * SLOT + (seed % (SLOT - length + 1))
        type_, flags, payload = {
            "read": (Command.READ, 0, b""), "write": (Command.WRITE, 0, None),
            "fua-write": (Command.WRITE, CommandFlag.FUA, None), "zero": (Command.WRITE_ZEROES, 0, b""),
            "trim": (Command.TRIM, 0, b""), "flush": (Command.FLUSH, 0, b""), "cache": (Command.CACHE, 0, b""),
            "beyond": (Command.READ, 0, b""), "unknown": (0x4000 + slot, 0, b""),
        }[kind]
        if kind == "flush":
            offset = length = 0
        if kind == "beyond":
            offset = SIZE - length + 1
        if payload is None:
            payload = random.Random(seed).randbytes(length)
        pending[cookie] = (type_, offset, length)
        plan[cookie] = (type_, flags, offset, length, payload)
        wire += codec.encode_request(flags, type_, cookie, offset, length) + payload
    before = bytes(served.disk.expected)
    w.send(bytes(wire))
    order = []
    while pending:
        cookie, err, data = w.reply_to(pending)
        type_, flags, offset, length, payload = plan[cookie]
        del pending[cookie]
        order.append(cookie)
        assert err == spec_errno(type_, flags, offset, length, structured), plan[cookie][:4]
        if err == 0:
            served.apply(type_, flags, offset, length, payload)
            if type_ == Command.READ:  # its slot is touched by no other request in the burst
                assert data == before[offset:offset + length]
    assert sorted(order) == sorted(plan)
    w.close()
    served.healthy()


# ---------------------------------------------------------------- desync and abrupt ends
def test_bad_request_magic_closes_only_that_connection(served):
    w = served.connect()
    w.send(b"\x25\x60\x95\x14" + bytes(24))
    expect_closed(w, "bad request magic")
    served.healthy()


def test_oversized_write_payload_closes_without_writing(served):
    w = served.connect()
    w.request(Command.WRITE, 0, MAX_PAYLOAD + 1, payload=b"\x77" * 65536)
    expect_closed(w, "WRITE longer than the maximum payload")
    served.healthy()


def test_disc_answers_outstanding_requests_first(served):
    # the spec: on NBD_CMD_DISC the server MUST handle all outstanding requests
    w = served.connect()
    data = os.urandom(8192)
    w.send(codec.encode_request(0, Command.WRITE, 1, 65536, len(data)) + data
           + codec.encode_request(0, Command.READ, 2, 0, 4096)
           + codec.encode_request(0, Command.DISC, 3, 0, 0))
    pending = {1: (Command.WRITE, 65536, len(data)), 2: (Command.READ, 0, 4096)}
    got = {}
    while pending:
        cookie, err, payload = w.reply_to(pending)
        got[cookie] = (err, payload)
        del pending[cookie]
    assert got == {1: (0, b""), 2: (0, bytes(served.disk.expected[:4096]))}
    served.disk.write(65536, data)
    expect_closed(w, "after NBD_CMD_DISC")
    served.healthy()


@FUZZ
@given(st.lists(st.tuples(st.integers(0, SIZE - 8192), st.integers(1, 8192)), max_size=3),
       st.integers(0, SIZE - 65536), st.integers(1, 65536), st.integers(0, 2**32), st.floats(0, 1),
       st.booleans(), st.booleans())
def test_abrupt_disconnect_mid_request_writes_nothing(served, done, offset, length, seed, cut_at, rst,
                                                      structured):
    """Complete some writes (acknowledged, so they must be in the file), then
    send part of one more request -- header or payload -- and vanish. The
    unfinished write must leave no trace."""
    w = served.connect(structured)
    for off, n in done:
        data = random.Random(seed + off).randbytes(n)
        assert w.call(Command.WRITE, off, n, payload=data) == (0, b"")
        served.disk.write(off, data)
    message = codec.encode_request(CommandFlag.FUA, Command.WRITE, 99, offset, length) \
        + b"\x5a" * length
    cut = int(cut_at * (len(message) - 1))  # never the whole message
    if cut:
        w.send(message[:cut])
    w.close(rst=rst)
    time.sleep(0.01)
    served.healthy()
