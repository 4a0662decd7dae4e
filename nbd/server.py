"""Asyncio NBD server: fixed-newstyle handshake, many exports, pipelined
requests answered out of order, optional or forced TLS.

A thin shell around `nbd.codec`: it reads the lengths the codec announces and
applies the policy below. Policy, per the spec (doc/proto.md):

- A client that does not speak fixed newstyle, sets unknown client flags,
  sends a bad magic, or an option longer than `MAX_OPTION_DISCARD` is
  disconnected; shorter bad options get the spec's NBD_REP_ERR_* reply.
- In forced-TLS mode every option but STARTTLS and ABORT is answered
  NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which cannot carry an error, is
  answered by closing), so a client without TLS learns nothing, not even the
  export names. The TLS layer itself requires a client certificate signed by
  the cluster CA.
- In transmission, each request is checked (range, flags, read-only,
  payload size) before an export sees it; errors carry the spec's errno and
  the connection stays usable. Only a bad request magic or an oversized
  WRITE payload (which would desynchronise the stream) closes it.
- Replies are sent as soon as each request completes (out of order). A
  request's reply header and data are written together, never interleaved.
- Per connection at most `max_inflight` requests run at once; a client that
  stops reading replies only stalls itself.
- Epochs (with an `epoch_gate`, which the ISU supplies): a client may declare
  the epoch its connection is bound to with Opie's option OPT_OPIE_EPOCH
  (after STARTTLS, before GO); the gate admits it (NBD_REP_ACK) or refuses
  it (NBD_REP_ERR_POLICY with the reason, and GO/EXPORT_NAME are refused on
  that connection from then on). The gate is asked again, for the declared
  epoch or 0 (none), when the connection picks its export; it may admit it
  read-only (READ_ONLY advertised, writes EPERM). `fence(E)` ends every
  session bound to an epoch below E. Without a gate the option is answered
  NBD_REP_ERR_UNSUP, so a client relying on fencing learns it has none.
- On plain (non-TLS) connections to exports with a file descriptor
  (`splice_fd()`), a valid WRITE whose payload is still mostly in the socket
  is received with splice(2) in a per-connection thread (`nbd.splice`) while
  reading is paused; everything else about the request is unchanged.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Protocol

from opie.nbd import codec, splice
from opie.nbd.codec import ProtocolError
from opie.nbd.constants import (
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MIN_BLOCK,
    OPT_OPIE_EPOCH,
    PREFERRED_BLOCK,
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
    wire_errno,
)
from opie.nbd.export import Export

log = logging.getLogger(__name__)

ZERO_COPY_MIN = 64 * 1024  # READs this large from a file export go out with sendfile
MAX_OPTION_DISCARD = 1 << 20  # longer option data than this closes the connection
HANDSHAKE_TIMEOUT = 30.0
SESSION_END_TIMEOUT = 2.0  # a closing session waits this long for its requests, then its socket
FENCE_TIMEOUT = 10.0  # a fenced session's running requests get this long to finish
KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES


# Plain-int copies of enum values for the per-request path.
_READ, _WRITE, _FLUSH, _TRIM, _CACHE, _WRITE_ZEROES = (int(Command.READ), int(Command.WRITE), int(Command.FLUSH),
                                                       int(Command.TRIM), int(Command.CACHE), int(Command.WRITE_ZEROES))
_SERVED_COMMANDS = frozenset((_READ, _WRITE, _FLUSH, _TRIM, _CACHE, _WRITE_ZEROES))
_MODIFYING = frozenset((_WRITE, _TRIM, _WRITE_ZEROES))
_FUA, _NO_HOLE, _DF = int(CommandFlag.FUA), int(CommandFlag.NO_HOLE), int(CommandFlag.DF)
_KNOWN_CMD_FLAGS = _FUA | _NO_HOLE | _DF


class TLSMode:
    OFF = "off"          # no STARTTLS offered
    ALLOW = "allow"      # STARTTLS offered, plain text also served
    REQUIRE = "require"  # forced TLS


class _Close(Exception):
    """End this connection now (after logging why)."""


@dataclass(frozen=True)
class Admission:
    """An epoch gate's answer for a connection of some epoch (0: none declared)."""

    refused: str | None = None  # why the connection may not go on; None: admitted
    read_only: bool = False     # admitted, but READ_ONLY is advertised and writes get EPERM


class EpochGate(Protocol):
    """Decides which epochs may use the server's exports (the ISU's fencing)."""

    def admit(self, epoch: int) -> Admission:
        """Called under the server's session lock from any of its threads: must not block."""


@dataclass
class _Session:
    peer: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    no_zeroes: bool = False
    local: bool = False  # on the 0600 Unix socket: forced TLS does not apply
    tls: bool = False
    structured: bool = False
    export: Export | None = None
    tasks: set = field(default_factory=set)
    out: "_TransmissionProtocol | None" = None
    epoch: int = 0                 # admitted epoch (0: none declared)
    epoch_refused: str | None = None
    read_only: bool = False        # the gate admitted this session read-only
    fenced: bool = False           # its epoch was fenced: every request is refused


class NBDServer:
    """Serve `exports` (name -> Export) over TCP.

    `default_export` names the export a client gets when it asks for the
    empty name. `tls_context` is a server SSLContext (see `nbd.tls`); with it,
    `tls_mode` is ALLOW or REQUIRE. Start with `await start(host, port)`,
    stop with `await close()`, which also ends open connections. Add an
    export by setting `exports[name]`; take one away with
    `await remove_export(name)`, which also ends the sessions open on it.
    `epoch_gate`: see the module docstring and `fence`.
    """

    def __init__(self, exports: dict[str, Export], *, default_export: str | None = None,
                 tls_context: ssl.SSLContext | None = None, tls_mode: str | None = None,
                 max_inflight: int = 64, workers: int = 0, epoch_gate: EpochGate | None = None):
        self.exports = dict(exports)
        self.default_export = default_export
        self.tls_context = tls_context
        self.tls_mode = tls_mode or (TLSMode.REQUIRE if tls_context else TLSMode.OFF)
        if self.tls_mode != TLSMode.OFF and tls_context is None:
            raise ValueError("TLS mode needs a TLS context")
        self.max_inflight = max_inflight
        self.epoch_gate = epoch_gate
        if workers and not all(getattr(e, "thread_safe", False) for e in self.exports.values()):
            raise ValueError("worker threads need exports that are thread-safe")
        self.n_workers = workers
        self._workers: list[_Worker] = []
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._server: asyncio.base_events.Server | None = None
        self._unix_servers: list = []
        self._sessions: dict[asyncio.Task, _Session] = {}
        self._lock = threading.Lock()  # guards _sessions when workers run
        self.connections_served = 0
        self.payloads_spliced = 0  # WRITE payloads received with splice(2) (approximate with workers)

    # ------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (port 0: any free port); return the address.

        With `workers` > 0, each accepted connection is served, handshake to
        close, by one of that many threads, each running its own event loop
        (round robin). The syscalls of different connections then run in
        parallel; only exports marked `thread_safe` may be served this way."""
        if not self.n_workers:
            self._server = await asyncio.start_server(self._serve, host, port, limit=1 << 22)
            sockname = self._server.sockets[0].getsockname()
        else:
            self._workers = [_Worker(i) for i in range(self.n_workers)]
            self._listener = socket.create_server((host, port), backlog=128)
            self._listener.setblocking(False)
            sockname = self._listener.getsockname()
            self._accepting = asyncio.ensure_future(self._accept_loop())
        log.info("serving %d export(s) on %s:%d (tls %s%s)", len(self.exports), sockname[0], sockname[1],
                 self.tls_mode, f", {self.n_workers} worker threads" if self.n_workers else "")
        return sockname[0], sockname[1]

    async def start_unix(self, path: str, mode: int = 0o600) -> str:
        """Also listen on a Unix socket at `path` (mode 0600: only this host's
        root may connect). Plain NBD, no TLS: for local clients such as the
        head's own nbdfuse mounts. Served on the main loop."""
        if os.path.exists(path):
            os.unlink(path)
        unix = await asyncio.start_unix_server(functools.partial(self._serve, local=True), path, limit=1 << 22)
        os.chmod(path, mode)
        self._unix_servers.append(unix)
        log.info("serving %d export(s) on unix socket %s", len(self.exports), path)
        return path

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.error("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._workers[n % len(self._workers)].submit(self._adopt(conn))
            n += 1

    async def _adopt(self, conn: socket.socket) -> None:
        """Runs on a worker loop: serve the accepted socket as a server-side
        stream (so STARTTLS takes the server role), exactly like start_server."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 22, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, self._serve, loop=loop)
        try:
            await loop.connect_accepted_socket(lambda: protocol, sock=conn)
        except OSError:
            conn.close()

    async def close(self) -> None:
        if self._accepting:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener:
            self._listener.close()
        if self._server:
            self._server.close()
        for u in self._unix_servers:
            u.close()
        await self._end_sessions(None)
        if self._workers:
            for w in self._workers:
                w.stop()
            self._workers = []
            return
        if self._server:
            await self._server.wait_closed()
        for u in self._unix_servers:
            await u.wait_closed()

    async def remove_export(self, name: str) -> None:
        """Stop offering export `name` and end every session open on it (in
        transmission, or past its lookup in the handshake): their requests
        in flight are cancelled, unanswered, and their connections closed.
        When this returns none of them runs a request any more (bounded by
        SESSION_END_TIMEOUT per session). Call it on the server's loop."""
        export = self.exports.pop(name, None)
        if export is not None:
            await self._end_sessions(export)
            log.info("export %s removed", name)

    async def _end_sessions(self, export: Export | None) -> None:
        """Cancel and await the sessions on `export` (None: all), on this loop
        and on every worker's."""
        await self._on_every_loop(lambda: self._end_local_sessions(export), return_exceptions=True)

    async def _on_every_loop(self, job, return_exceptions: bool = False) -> list:
        """Run the coroutine `job()` on every worker's loop and on this one; their results."""
        results: list = []
        if self._workers:
            results = await asyncio.gather(*(asyncio.wrap_future(w.submit(job())) for w in self._workers),
                                           return_exceptions=return_exceptions)
        return [*results, await job()]

    async def fence(self, epoch: int, timeout: float = FENCE_TIMEOUT) -> int:
        """End every session bound to an epoch below `epoch` (sessions that
        declared none included); return how many. Call it on the server's
        loop, once the gate refuses such epochs, so none is admitted meanwhile.

        Order: under the session lock every such session is marked, and from
        then on each request it sends is refused (EPERM), spliced WRITEs
        included. Then, on each session's loop, its reading stops, a WRITE
        payload being spliced is aborted (its thread stopped), the requests
        already running finish (their replies may still go out), and the
        session closes. When this returns none of them can write any more.
        TimeoutError when a request did not finish within `timeout` (it may
        still reach the disk: the caller must not acknowledge the fence)."""
        with self._lock:
            for s in self._sessions.values():
                if s.epoch < epoch:
                    s.fenced = True
        ended = await self._on_every_loop(lambda: self._end_local_fenced(timeout))
        stuck = sum(n for _, n in ended)
        if stuck:
            raise TimeoutError(f"{stuck} fenced request(s) still running after {timeout:.0f} s")
        count = sum(n for n, _ in ended)
        log.info("fenced epochs below %d: %d session(s) ended", epoch, count)
        return count

    async def _end_local_fenced(self, timeout: float) -> tuple[int, int]:
        """End the fenced sessions running on the calling loop: their running
        requests finish first (at most `timeout`). (ended, still stuck)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            mine = [(t, s) for t, s in self._sessions.items() if t.get_loop() is loop and s.fenced]
        for t, s in mine:
            if s.out is not None:
                s.out._stop("epoch fenced")   # its session task awaits the running requests
            else:
                t.cancel()                   # still in the handshake: nothing running
        tasks = [t for t, _ in mine]
        if not tasks:
            return 0, 0
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=SESSION_END_TIMEOUT)
        return len(mine), len(pending)

    async def _end_local_sessions(self, export: Export | None) -> None:
        """Cancel and await the sessions on `export` (None: all) running on the calling loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            mine = [t for t, s in self._sessions.items()
                    if t.get_loop() is loop and (export is None or s.export is export)]
        for t in mine:
            t.cancel()
        await asyncio.gather(*mine, return_exceptions=True)

    def lookup(self, name: str) -> Export | None:
        if name == "" and self.default_export is not None:
            name = self.default_export
        return self.exports.get(name)

    # ------------------------------------------------------------ connection
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, local: bool = False) -> None:
        task = asyncio.current_task()
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else "unix"
        s = _Session(peer, reader, writer, local=local)
        with self._lock:
            self._sessions[task] = s
        self.connections_served += 1
        try:
            try:
                await asyncio.wait_for(self._handshake(s), HANDSHAKE_TIMEOUT)
            except asyncio.TimeoutError:
                raise _Close("handshake timed out") from None
            if s.export is not None:
                await self._transmission(s)
        except _Close as exc:
            log.debug("%s: closing: %s", peer, exc)
        except ProtocolError as exc:
            log.warning("%s: protocol error, closing: %s", peer, exc)
        except ssl.SSLError as exc:
            log.warning("%s: TLS failure, closing: %s", peer, exc)
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
            log.debug("%s: client went away", peer)
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must not take down other clients
            log.exception("%s: unexpected error, closing connection", peer)
        finally:
            requests = list(s.tasks)
            for t in requests:
                t.cancel()
            if requests:  # a cancelled request may still be unwinding (releasing locks)
                await asyncio.wait(requests, timeout=SESSION_END_TIMEOUT)
            writer.close()
            # in transmission the stream's protocol was replaced: its
            # wait_closed() would never finish, the transmission one's `lost` does
            closed = s.out.lost if s.out is not None else writer.wait_closed()
            try:
                await asyncio.wait_for(closed, SESSION_END_TIMEOUT)
            except (Exception, asyncio.CancelledError):
                pass
            with self._lock:
                self._sessions.pop(task, None)

    # ------------------------------------------------------------ handshake
    async def _handshake(self, s: _Session) -> None:
        s.writer.write(codec.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        await s.writer.drain()
        flags = codec.decode_client_flags(await s.reader.readexactly(codec.CLIENT_FLAGS_SIZE))
        if flags & ~int(KNOWN_CLIENT_FLAGS):  # ~ of an IntFlag keeps only defined bits: use the int
            raise _Close(f"unknown client flags {flags:#x}")
        if not flags & ClientFlag.FIXED_NEWSTYLE:
            raise _Close("client does not speak fixed newstyle")
        s.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        while s.export is None:
            hdr = codec.decode_option_header(await s.reader.readexactly(codec.OPTION_HEADER_SIZE))
            if hdr.length > MAX_OPTION_LENGTH:
                if hdr.length > MAX_OPTION_DISCARD or hdr.option == Option.EXPORT_NAME:
                    raise _Close(f"{codec.option_name(hdr.option)} with {hdr.length} bytes of data")
                await _discard(s.reader, hdr.length)
                await self._reply(s, hdr.option, Reply.ERR_TOO_BIG, b"option data too long")
                continue
            data = await s.reader.readexactly(hdr.length)
            if await self._option(s, hdr.option, data):
                return

    async def _reply(self, s: _Session, option: int, reply: int, data: bytes = b"") -> None:
        s.writer.write(codec.encode_option_reply(option, reply, data))
        await s.writer.drain()

    def _tls_missing(self, s: _Session) -> bool:
        return self.tls_mode == TLSMode.REQUIRE and not s.tls and not s.local

    async def _option(self, s: _Session, option: int, data: bytes) -> bool:
        """Handle one option; True when the session ends the handshake."""
        log.debug("%s: %s (%d bytes)", s.peer, codec.option_name(option), len(data))
        if option == Option.ABORT:
            await self._reply(s, option, Reply.ACK)
            raise _Close("client sent NBD_OPT_ABORT")
        if option == Option.STARTTLS:
            return await self._starttls(s, data)
        if option == Option.EXPORT_NAME:
            if self._tls_missing(s):
                raise _Close("NBD_OPT_EXPORT_NAME before STARTTLS in forced-TLS mode")
            name = codec.decode_export_name(data)
            export = self.lookup(name)
            if export is None:
                raise _Close(f"NBD_OPT_EXPORT_NAME for unknown export {name!r}")
            refused = self._bind(s, export)  # before any await: remove_export sees the session from here on
            if refused:
                raise _Close(f"NBD_OPT_EXPORT_NAME refused: {refused}")
            s.writer.write(codec.encode_export_name_reply(export.size, self._tflags(s, export), s.no_zeroes))
            await s.writer.drain()
            return True
        if self._tls_missing(s):
            await self._reply(s, option, Reply.ERR_TLS_REQD, b"TLS required")
            return False
        if option == Option.LIST:
            if data:
                await self._reply(s, option, Reply.ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return False
            for name, export in self.exports.items():
                await self._reply(s, option, Reply.SERVER, codec.encode_server_entry(name, export.description))
            await self._reply(s, option, Reply.ACK)
            return False
        if option in (Option.INFO, Option.GO):
            return await self._info(s, option, data)
        if option == OPT_OPIE_EPOCH:
            await self._declare_epoch(s, data)
            return False
        if option == Option.STRUCTURED_REPLY:
            if data:
                await self._reply(s, option, Reply.ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
            elif s.structured:
                await self._reply(s, option, Reply.ERR_INVALID, b"structured replies already negotiated")
            else:
                s.structured = True
                await self._reply(s, option, Reply.ACK)
            return False
        await self._reply(s, option, Reply.ERR_UNSUP, f"{codec.option_name(option)} not supported".encode())
        return False

    async def _starttls(self, s: _Session, data: bytes) -> bool:
        if data:
            await self._reply(s, Option.STARTTLS, Reply.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            return False
        if self.tls_context is None:
            await self._reply(s, Option.STARTTLS, Reply.ERR_POLICY, b"TLS is not enabled on this server")
            return False
        if s.tls:
            await self._reply(s, Option.STARTTLS, Reply.ERR_INVALID, b"TLS already negotiated")
            return False
        await self._reply(s, Option.STARTTLS, Reply.ACK)
        await s.writer.start_tls(self.tls_context)
        s.tls = True
        s.structured = False  # the spec: state negotiated before TLS is forgotten
        cert = s.writer.get_extra_info("peercert") or {}
        subject = dict(x[0] for x in cert.get("subject", ())).get("commonName", "?")
        log.info("%s: TLS established with client %s", s.peer, subject)
        return False

    async def _info(self, s: _Session, option: int, data: bytes) -> bool:
        try:
            req = codec.decode_info_request(data)
        except ProtocolError as exc:
            await self._reply(s, option, Reply.ERR_INVALID, str(exc).encode())
            return False
        export = self.lookup(req.name)
        if export is None:
            await self._reply(s, option, Reply.ERR_UNKNOWN, f"no export named {req.name!r}".encode())
            return False
        refused = self._bind(s, export) if option == Option.GO else self._admission(s).refused
        if refused:  # GO binds before any await: remove_export sees the session from here on
            await self._reply(s, option, Reply.ERR_POLICY, refused.encode()[:4096])
            return False
        await self._reply(s, option, Reply.INFO, codec.encode_info_export(export.size, self._tflags(s, export)))
        for kind in set(req.requests):
            if kind == Info.BLOCK_SIZE:
                payload = codec.encode_info_block_size(MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD)
            elif kind == Info.NAME:
                payload = codec.encode_info_text(Info.NAME, export.name)
            elif kind == Info.DESCRIPTION:
                payload = codec.encode_info_text(Info.DESCRIPTION, export.description)
            else:
                continue
            await self._reply(s, option, Reply.INFO, payload)
        await self._reply(s, option, Reply.ACK)
        return option == Option.GO

    async def _declare_epoch(self, s: _Session, data: bytes) -> None:
        """OPT_OPIE_EPOCH: bind the session to the epoch if the gate admits it."""
        opt = OPT_OPIE_EPOCH
        if self.epoch_gate is None:
            return await self._reply(s, opt, Reply.ERR_UNSUP, b"this server does not fence by epoch")
        try:
            epoch = codec.decode_epoch(data)
        except ProtocolError as exc:
            return await self._reply(s, opt, Reply.ERR_INVALID, str(exc).encode())
        if s.epoch or s.epoch_refused:
            return await self._reply(s, opt, Reply.ERR_INVALID, b"an epoch was already declared on this connection")
        with self._lock:
            admission = self.epoch_gate.admit(epoch)
            if admission.refused is None:
                s.epoch, s.read_only = epoch, admission.read_only
        if admission.refused is not None:
            s.epoch_refused = admission.refused
            log.warning("%s: epoch %d refused: %s", s.peer, epoch, admission.refused)
            return await self._reply(s, opt, Reply.ERR_POLICY, admission.refused.encode()[:4096])
        await self._reply(s, opt, Reply.ACK)

    def _admission(self, s: _Session) -> Admission:
        """Ask the gate (again: a fence may have come since the epoch was
        declared) and note whether the session is read-only. Under the
        session lock, so `fence` either sees the session bound to its epoch
        or the gate already refuses that epoch."""
        if s.epoch_refused:
            return Admission(refused=s.epoch_refused)
        if self.epoch_gate is None:
            return Admission()
        with self._lock:
            admission = self.epoch_gate.admit(s.epoch)
            s.read_only = admission.read_only
        return admission

    def _bind(self, s: _Session, export: Export) -> str | None:
        """Give the session its export if the gate admits it; else why not.
        (`fence` picks sessions by epoch, so binding needs no lock of its own.)"""
        admission = self._admission(s)
        if admission.refused is None:
            s.export = export
        return admission.refused

    @staticmethod
    def _tflags(s: _Session, export: Export) -> int:
        f = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_CACHE
        if export.read_only or s.read_only:
            f |= TransmissionFlag.READ_ONLY
        else:
            if export.can_trim:
                f |= TransmissionFlag.SEND_TRIM
            if export.can_zero:
                f |= TransmissionFlag.SEND_WRITE_ZEROES
        if export.can_multi_conn:
            f |= TransmissionFlag.CAN_MULTI_CONN
        if s.structured:
            f |= TransmissionFlag.SEND_DF
        return int(f)

    # ------------------------------------------------------------ transmission
    async def _transmission(self, s: _Session) -> None:
        """Serve requests until DISC, EOF or a fatal protocol error.

        The stream reader used for the handshake hands over to a buffered
        protocol: write payloads are received straight into their own buffer
        (no intermediate copies), which is what keeps up with nbdkit."""
        export = s.export
        assert export is not None
        log.debug("%s: serving export %r (%d bytes)", s.peer, export.name, export.size)
        transport = s.writer.transport
        proto = _TransmissionProtocol(self, s, transport)
        s.out = proto
        leftover = bytes(s.reader._buffer)  # bytes the handshake reader already pulled in
        s.reader._buffer.clear()
        transport.set_protocol(proto)
        try:
            if leftover:
                proto.feed(leftover)
            if not proto.read_paused:
                transport.resume_reading()
            await proto.finished
            if s.tasks:
                await asyncio.gather(*list(s.tasks), return_exceptions=True)
        finally:
            if proto.splicer is not None:
                proto.splicer.close()
        if proto.close_reason:
            raise _Close(proto.close_reason)

    def _check(self, s: _Session, req: codec.Request) -> tuple[int, str] | None:
        """Validate a request; return (errno, why) to refuse it. Runs per
        request, so it compares plain ints rather than enum members."""
        export = s.export
        cmd, flags = req.type, req.flags
        if s.fenced:
            return Errno.EPERM, f"this connection's epoch {s.epoch} was fenced"
        if flags & ~_KNOWN_CMD_FLAGS:
            return Errno.EINVAL, f"unsupported command flags {flags:#x}"
        if cmd not in _SERVED_COMMANDS:
            if cmd in (Command.BLOCK_STATUS, Command.RESIZE):
                return Errno.EINVAL, f"NBD_CMD_{Command(cmd).name} not negotiated"
            return Errno.EINVAL, f"unknown command {cmd}"
        if flags & _DF and (cmd != _READ or not s.structured):
            return Errno.EINVAL, "DF flag only valid on READ with structured replies"
        if flags & _NO_HOLE and cmd != _WRITE_ZEROES:
            return Errno.EINVAL, "NO_HOLE flag only valid on WRITE_ZEROES"
        if cmd == _FLUSH:
            if req.offset or req.length:
                return Errno.EINVAL, "FLUSH with non-zero offset or length"
            return None
        if cmd in _MODIFYING:
            if export.read_only or s.read_only:
                return Errno.EPERM, "export is read-only"
            if (cmd == _TRIM and not export.can_trim) or (cmd == _WRITE_ZEROES and not export.can_zero):
                return Errno.EINVAL, f"NBD_CMD_{Command(cmd).name} not supported by this export"
        if req.length > MAX_PAYLOAD and cmd in (_READ, _WRITE):
            return Errno.EINVAL, f"length {req.length} exceeds the {MAX_PAYLOAD}-byte maximum"
        if req.offset + req.length > export.size:
            err = Errno.ENOSPC if cmd in (_WRITE, _WRITE_ZEROES) else Errno.EINVAL
            return err, f"range {req.offset}+{req.length} beyond the export's {export.size} bytes"
        return None

    async def _handle(self, s: _Session, req: codec.Request, payload: bytes) -> None:
        refused = self._check(s, req)
        data = None
        if refused:
            err, why = refused
            log.debug("%s: refusing request %s: %s", s.peer, req, why)
            return await self._send_error(s, req, err, why)
        export = s.export
        fua = bool(req.flags & _FUA)
        try:
            t = req.type
            if t == _READ:
                if req.length >= ZERO_COPY_MIN and not s.tls and s.out.send_file_range(s, req, export):
                    return
                data = await export.read(req.offset, req.length) if req.length else b""
            elif t == _WRITE:
                if req.length:
                    await export.write(req.offset, payload, fua)
                elif fua:
                    await export.flush()
            elif t == _FLUSH:
                await export.flush()
            elif t == _TRIM:
                if req.length:
                    await export.trim(req.offset, req.length, fua)
            elif t == _WRITE_ZEROES:
                if req.length:
                    await export.write_zeroes(req.offset, req.length, fua, not req.flags & _NO_HOLE)
            elif t == _CACHE:
                await export.cache(req.offset, req.length)
        except OSError as exc:
            log.warning("%s: export %s: %s at %d+%d failed: %s", s.peer, export.name,
                        Command(req.type).name, req.offset, req.length, exc)
            return await self._send_error(s, req, wire_errno(exc.errno or errno.EIO), str(exc))
        out = s.out
        if data is not None and s.structured:
            if len(data):
                out.send(codec.encode_offset_data_header(ReplyFlag.DONE, req.cookie, req.offset, len(data)), data)
            else:
                out.send(codec.encode_chunk_header(ReplyFlag.DONE, 0, req.cookie, 0))
        else:
            out.send(codec.encode_simple_reply(req.cookie), data)

    async def _send_error(self, s: _Session, req: codec.Request, err: int, why: str) -> None:
        if req.type == Command.READ and s.structured:
            s.out.send(codec.encode_error_chunk(ReplyFlag.DONE, req.cookie, err, why))
        else:
            # A failed simple READ reply carries no data, per the spec.
            s.out.send(codec.encode_simple_reply(req.cookie, err))


class _BufferPool:
    """Recycled WRITE payload buffers, so a busy connection does not allocate
    and zero a fresh buffer per request. Exports must not keep a reference to
    a write's data after the write returns (the Export contract)."""

    MIN, MAX_PER_SIZE = 4096, 128

    def __init__(self) -> None:
        self.free: dict[int, list[bytearray]] = {}

    def get(self, n: int) -> bytearray:
        lst = self.free.get(n)
        return lst.pop() if lst else bytearray(n)

    def put(self, buf: bytearray) -> None:
        if len(buf) >= self.MIN:
            lst = self.free.setdefault(len(buf), [])
            if len(lst) < self.MAX_PER_SIZE:
                lst.append(buf)


class _Worker:
    """A thread running its own event loop, serving the connections given to it."""

    def __init__(self, index: int):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"nbd-worker-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def submit(self, coro):
        """Schedule coro on this worker (thread-safe); returns a concurrent Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class _TransmissionProtocol(asyncio.BufferedProtocol):
    """Parses requests from the byte stream and starts one task per request.

    Headers land in a staging buffer; a WRITE payload is received directly
    into a bytearray of its own length. Reading pauses while `max_inflight`
    requests are running or while the transport's write buffer is full (a
    client that does not read its replies stalls only itself)."""

    STAGING = 1 << 16

    def __init__(self, server: NBDServer, s: _Session, transport: asyncio.Transport):
        self.server, self.s, self.transport = server, s, transport
        self.buf = bytearray(self.STAGING)
        self.view = memoryview(self.buf)
        self.pos = 0
        self.pending: codec.Request | None = None
        self.payload: bytearray | None = None
        self.payload_pos = 0
        self.inflight = 0
        self.write_paused = False
        self.read_paused = False
        self.stopped = False
        self.close_reason: str | None = None
        self.small: list[bytes] = []
        self.flush_scheduled = False
        sock = transport.get_extra_info("socket")
        self.sock_fd = sock.fileno() if sock is not None and transport.get_extra_info("sslcontext") is None else None
        self.pool = _BufferPool()
        self.payloads: dict[asyncio.Task, bytearray] = {}
        self.finished = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()  # done when the transport is gone
        self.splicer: splice.PayloadSplicer | None = None
        self.can_splice = self.sock_fd is not None and splice.available()
        self.splicing = False  # a payload is being spliced: the socket is the splicer's
        self.spliced: collections.deque = collections.deque()  # (request, error) for the loop to answer
        self.answer_scheduled = False
        self.feeding = False

    # -- asyncio callbacks
    def get_buffer(self, sizehint: int) -> memoryview:
        if self.payload is not None:
            return memoryview(self.payload)[self.payload_pos:]
        if self.pos == len(self.buf):  # cannot happen: headers are parsed as they complete
            raise ProtocolError("staging buffer overflow")
        return self.view[self.pos:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.payload is not None:
            self.payload_pos += nbytes
            if self.payload_pos == len(self.payload):
                req, data = self.pending, self.payload
                self.pending, self.payload = None, None
                self._dispatch(req, data)
            return
        self.pos += nbytes
        self._parse()

    def feed(self, data: bytes) -> None:
        """Bytes received before the hand-over, processed as if just read."""
        mv = memoryview(data)
        try:
            while mv and not self.stopped:
                dst = self.get_buffer(len(mv))
                n = min(len(dst), len(mv))
                dst[:n] = mv[:n]
                mv = mv[n:]
                self.feeding = bool(mv)  # a payload continuing in `mv` is not in the socket: no splicing
                self.buffer_updated(n)
        finally:
            self.feeding = False

    def eof_received(self) -> bool:
        self._stop(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop(None)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._flow()

    # -- replies
    def send(self, header: bytes, data=None) -> None:
        """Queue a reply. Header-only replies completing in the same loop
        iteration go out in one send; a reply with data is written at once,
        header and data back to back, so replies never interleave."""
        if self.transport.is_closing():
            return
        if data:
            self._flush_out()
            if self.sock_fd is None:  # TLS: one record, one send
                self.transport.write(header + bytes(data))
            else:
                self.transport.write(header)
                self.transport.write(data)
            return
        self.small.append(header)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self.flush_scheduled = False
        if self.small:
            if not self.transport.is_closing():
                self.transport.write(b"".join(self.small))
            self.small.clear()

    def send_file_range(self, s: _Session, req: codec.Request, export: Export) -> bool:
        """Answer a READ straight from the export's file with os.sendfile (one
        copy, page cache to socket, instead of pread + send). Only on plain
        TCP, only when nothing else is queued on the transport (so the reply
        stays contiguous); whatever the socket does not take now is read and
        queued on the transport at once, still in order. Returns False, having
        sent nothing, when it does not apply."""
        fd = export.sendfile_fd() if hasattr(export, "sendfile_fd") else None
        t = self.transport
        if fd is None or t.is_closing():
            return False
        self._flush_out()
        if t.get_write_buffer_size() or self.sock_fd is None:
            return False
        if s.structured:
            header = codec.encode_offset_data_header(ReplyFlag.DONE, req.cookie, req.offset, req.length)
        else:
            header = codec.encode_simple_reply(req.cookie)
        try:
            n = os.write(self.sock_fd, header)
        except BlockingIOError:
            n = 0
        except OSError:
            return False  # the connection is going; let the normal path notice
        if n < len(header):
            t.write(header[n:])
            t.write(export.read_now(req.offset, req.length))
            return True
        done, offset, length = 0, req.offset, req.length
        try:
            while done < length:
                sent = os.sendfile(self.sock_fd, fd, offset + done, length - done)
                if sent == 0:
                    raise OSError(errno.EIO, "file ended inside the export")
                done += sent
        except BlockingIOError:
            pass
        except OSError as exc:
            # The success header is out: the only honest thing left is to drop
            # the connection (the spec's answer to an error mid-reply).
            export.io_error(exc) if hasattr(export, "io_error") else None
            log.error("%s: READ %d+%d failed after the reply started: %s; closing", s.peer, offset, length, exc)
            t.abort()
            return True
        if done < length:
            try:
                t.write(export.read_now(offset + done, length - done))
            except OSError as exc:
                log.error("%s: READ %d+%d failed after the reply started: %s; closing", s.peer, offset, length, exc)
                t.abort()
        return True

    # -- parsing
    def _parse(self) -> None:
        buf, size = self.buf, codec.REQUEST_SIZE
        start = 0
        try:
            while not self.stopped and self.pos - start >= size:
                req = codec.decode_request(self.view[start:start + size])
                start += size
                if req.type == Command.WRITE:
                    if req.length > MAX_PAYLOAD:
                        return self._stop(f"WRITE of {req.length} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
                    have = min(self.pos - start, req.length)
                    if req.length - have >= splice.SPLICE_MIN and self._splice(req, self.view[start:start + have]):
                        start += have
                        break
                    payload = self.pool.get(req.length)
                    payload[:have] = self.view[start:start + have]
                    start += have
                    if have < req.length:
                        self.pending, self.payload, self.payload_pos = req, payload, have
                        break
                    self._dispatch(req, payload)
                elif req.type == Command.DISC:
                    return self._stop("client sent NBD_CMD_DISC")
                else:
                    self._dispatch(req, b"")
        except ProtocolError as exc:
            return self._stop(f"protocol error: {exc}")
        finally:
            if start:
                rest = self.pos - start
                buf[:rest] = self.view[start:self.pos]
                self.pos = rest

    def _splice(self, req: codec.Request, head: memoryview) -> bool:
        """Start receiving this WRITE's payload with the splicer (`head`, its
        first bytes, already read) and pause reading until it is in. False,
        with nothing done, when splicing does not apply: TLS, an export
        without a file descriptor, or a request the server refuses (its
        payload is then received and discarded as usual)."""
        if not self.can_splice or self.feeding:
            return False
        s = self.s
        export = s.export
        fd = export.splice_fd() if hasattr(export, "splice_fd") else None
        if fd is None or self.server._check(s, req) is not None:
            return False
        if self.splicer is None:
            try:
                self.splicer = splice.PayloadSplicer(self.sock_fd, s.peer)
            except OSError as exc:  # out of descriptors: the buffered path still works
                log.warning("%s: cannot splice WRITE payloads: %s", s.peer, exc)
                self.can_splice = False
                return False
        self.splicing = True
        self.server.payloads_spliced += 1
        self.inflight += 1
        task = asyncio.ensure_future(self._splice_writes(req, fd, bytes(head)))
        s.tasks.add(task)
        task.add_done_callback(self._done)
        self._flow()
        return True

    async def _splice_writes(self, req: codec.Request, fd: int, head: bytes) -> None:
        """Let the splicer's thread own the socket's input for this WRITE and
        those directly following it; parsing resumes when it gives it back.
        A client gone mid-payload closes the connection."""
        try:
            await self.splicer.run(self._splice_chain, asyncio.get_running_loop(), req, fd, head)
        except splice.PayloadEnded as exc:
            self._stop(str(exc))
        finally:
            self.splicing = False
            self._flow()

    def _splice_chain(self, loop: asyncio.AbstractEventLoop, req: codec.Request, fd: int, head: bytes) -> None:
        """In the splicer's thread: receive `req`'s payload, hand its result
        to the loop, and go on with the next request while it is a WRITE
        already waiting in the socket that passes `_check` and is worth
        splicing; anything else is left unread for the loop's parser. Stops
        as soon as the connection stops or its replies back up."""
        s, server, splicer = self.s, self.server, self.splicer
        while True:
            error = splicer.receive(fd, req.offset, head, req.length, bool(req.flags & _FUA))
            self.spliced.append((req, error))
            if not self.answer_scheduled:  # one wake-up of the loop answers a batch
                self.answer_scheduled = True
                try:
                    loop.call_soon_threadsafe(self._answer_spliced)
                except RuntimeError:  # the loop is gone: so is the connection
                    return
            if self.stopped or self.write_paused:
                return
            raw = splicer.peek(codec.REQUEST_SIZE)
            if raw is None:
                return
            try:
                req = codec.decode_request(raw)
            except ProtocolError:
                return  # the parser reports it
            if req.type != _WRITE or not splice.SPLICE_MIN <= req.length <= MAX_PAYLOAD:
                return
            fd = s.export.splice_fd()
            if fd is None or server._check(s, req) is not None:
                return
            splicer.take(codec.REQUEST_SIZE)
            server.payloads_spliced += 1
            head = b""

    def _answer_spliced(self) -> None:
        """On the loop: answer the spliced WRITEs done so far, as `_handle`
        answers a WRITE. The flag is cleared before the queue is emptied, so
        a result queued meanwhile is either taken now or scheduled again."""
        self.answer_scheduled = False
        export = self.s.export
        while self.spliced:
            req, error = self.spliced.popleft()
            if error is None:
                self.send(codec.encode_simple_reply(req.cookie))
                continue
            log.warning("%s: export %s: WRITE at %d+%d failed: %s", self.s.peer, export.name,
                        req.offset, req.length, error)
            if hasattr(export, "io_error"):
                export.io_error(error)
            self.send(codec.encode_simple_reply(req.cookie, wire_errno(error.errno or errno.EIO)))

    def _dispatch(self, req: codec.Request, payload) -> None:
        s = self.s
        self.inflight += 1
        task = asyncio.ensure_future(self.server._handle(s, req, payload))
        s.tasks.add(task)
        if payload:
            self.payloads[task] = payload
        task.add_done_callback(self._done)
        self._flow()

    def _done(self, task: asyncio.Task) -> None:
        self.s.tasks.discard(task)
        payload = self.payloads.pop(task, None)
        if payload is not None:
            self.pool.put(payload)
        self.inflight -= 1
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, (ConnectionError, RuntimeError)):
                log.error("%s: request handler failed: %r", self.s.peer, exc)
            self._stop(f"reply failed: {exc!r}")
        self._flow()

    def _flow(self) -> None:
        if self.stopped:
            return
        want_pause = self.splicing or self.write_paused or self.inflight >= self.server.max_inflight
        if want_pause and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True
        elif not want_pause and self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def _stop(self, reason: str | None) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.close_reason = reason
        if self.splicer is not None:
            self.splicer.close()  # a payload being spliced will never be finished
        if not self.transport.is_closing():
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass
        if not self.finished.done():
            self.finished.set_result(None)


async def _discard(reader: asyncio.StreamReader, n: int) -> None:
    while n:
        chunk = await reader.readexactly(min(n, 1 << 16))
        n -= len(chunk)
