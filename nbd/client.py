"""Asyncio NBD client with pipelining, timeouts and reconnect: the head's
connection to each RAID member.

Contract:
- Requests may be issued concurrently from many tasks; they are pipelined on
  one connection and complete in whatever order the server answers.
- `write(..., fua=True)` returns once the server acknowledged the write as
  durable; `flush()` returns once every write acknowledged before it was
  issued is durable.
- Every failure surfaces as `OSError` with an errno: the server's error
  (EIO, ENOSPC, EPERM, ...), ETIMEDOUT when a request outlives `timeout`,
  ECONNRESET when the connection is lost and cannot be re-established, ENOENT
  for an unknown export at connect time, EACCES when TLS is refused.
- On a lost connection the client reconnects (up to `reconnect_attempts`,
  with backoff, within the request timeout) and re-sends the requests that
  were in flight; NBD reads and writes are idempotent, so a re-sent request
  is harmless. A request that timed out is failed, not re-sent.
- Before anything is sent on a re-established connection the export must be
  the same one: same size, and accepted by the caller's `verify(read)` hook
  (e.g. the head checks the RAID superblock with `read`). A changed export
  fails the requests waiting for it with `ExportChanged` (ESTALE), without
  further attempts.
- Writes (and trims, zeroes) acknowledged without FUA since the last
  successful FLUSH may have died with the old connection's server. After a
  reconnect they count as lost: their ranges go to `on_lost(ranges)` (called
  on the client's loop before anything is re-sent), FLUSHes in flight fail
  with `WritesLost` (EIO), or the next `flush()` does when none was; the loss
  is reported once, like an fsync error.
- With an `epoch`, every connection (the first and each reconnect) declares
  it with Opie's OPT_OPIE_EPOCH option, after STARTTLS and before GO. A
  server that refuses it (a newer epoch fenced this one, or not fenced at
  this epoch yet, or no fencing at all) raises `EpochRefused` (EPERM); on a
  reconnect that fails the waiting requests at once, without retries.
  Without an epoch nothing is declared (any NBD server works).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

from opie.nbd import codec
from opie.nbd.codec import ExportInfo, ProtocolError
from opie.nbd.constants import (
    MAX_PAYLOAD,
    OPT_OPIE_EPOCH,
    ClientFlag,
    Command,
    CommandFlag,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from opie.nbd.errors import EpochRefused, ExportChanged, WritesLost

log = logging.getLogger(__name__)

ReadFn = Callable[[int, int], Awaitable[bytes]]
Verify = Callable[[ReadFn], Awaitable[None]]        # raises ExportChanged to refuse the export
OnLost = Callable[[list[tuple[int, int]]], None]   # (offset, length) of each lost range

_CACHED = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)  # durable only after a FLUSH without FUA


@dataclass
class _Pending:
    cookie: int
    header: bytes
    payload: bytes | memoryview | None
    read_len: int
    future: asyncio.Future
    command: int
    flags: int
    offset: int
    length: int
    flush_mark: int = 0  # FLUSH: it covers the cached writes acknowledged up to this ack number
    buf: bytearray | None = None


async def _read_option_reply(reader: asyncio.StreamReader) -> tuple[codec.OptionReplyHeader, bytes]:
    hdr = codec.decode_option_reply_header(await reader.readexactly(codec.OPTION_REPLY_SIZE))
    data = await reader.readexactly(hdr.length)
    return hdr, data


def _reply_error(option: int, reply: int, data: bytes) -> OSError:
    msg = data.decode("utf-8", "replace")
    code = {Reply.ERR_UNKNOWN: errno.ENOENT, Reply.ERR_TLS_REQD: errno.EACCES,
            Reply.ERR_POLICY: errno.EACCES, Reply.ERR_UNSUP: errno.ENOTSUP}.get(reply, errno.EPROTO)
    return OSError(code, f"{codec.option_name(option)}: {codec.reply_name(reply)}" + (f": {msg}" if msg else ""))


async def _open(host: str, port: int, tls: ssl.SSLContext | None, server_hostname: str | None):
    """TCP connect + greeting + client flags + optional STARTTLS."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        hflags = codec.decode_greeting(await reader.readexactly(codec.GREETING_SIZE))
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            raise OSError(errno.EPROTO, "server does not speak fixed newstyle")
        cflags = ClientFlag.FIXED_NEWSTYLE
        if hflags & HandshakeFlag.NO_ZEROES:
            cflags |= ClientFlag.NO_ZEROES
        writer.write(codec.encode_client_flags(cflags))
        if tls is not None:
            writer.write(codec.encode_option(Option.STARTTLS))
            await writer.drain()
            hdr, data = await _read_option_reply(reader)
            if hdr.reply != Reply.ACK:
                raise _reply_error(Option.STARTTLS, hdr.reply, data)
            try:
                await writer.start_tls(tls, server_hostname=server_hostname or host)
            except ssl.SSLError as exc:
                raise OSError(errno.EACCES, f"TLS handshake with {host}:{port} failed: {exc}") from None
        return reader, writer, bool(cflags & ClientFlag.NO_ZEROES)
    except BaseException:
        writer.close()
        raise


async def list_exports(host: str, port: int, *, tls: ssl.SSLContext | None = None,
                       server_hostname: str | None = None, timeout: float = 10.0) -> list[tuple[str, str]]:
    """NBD_OPT_LIST: the (name, description) of every export."""
    async def go():
        reader, writer, _ = await _open(host, port, tls, server_hostname)
        try:
            writer.write(codec.encode_option(Option.LIST))
            await writer.drain()
            out = []
            while True:
                hdr, data = await _read_option_reply(reader)
                if hdr.reply == Reply.SERVER:
                    out.append(codec.decode_server_entry(data))
                elif hdr.reply == Reply.ACK:
                    break
                else:
                    raise _reply_error(Option.LIST, hdr.reply, data)
            writer.write(codec.encode_option(Option.ABORT))
            await writer.drain()
            return out
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout)


async def _read_before_transmission(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                    offset: int, length: int) -> bytes:
    """One READ on a connection not yet handed to the pipelined protocol (for
    `verify`); cookie 0, which pipelined requests never use."""
    writer.write(codec.encode_request(0, Command.READ, 0, offset, length))
    await writer.drain()
    hdr = codec.decode_reply_header(await reader.readexactly(codec.SIMPLE_REPLY_SIZE))
    if hdr.structured or hdr.cookie != 0:
        raise ProtocolError(f"unexpected reply (cookie {hdr.cookie}) to the verifying READ")
    if hdr.error:
        raise OSError(hdr.error, f"verifying READ at {offset}+{length}: server error {hdr.error}")
    return await reader.readexactly(length)


class _ReplyProtocol(asyncio.BufferedProtocol):
    """Parses simple replies; READ data lands directly in the request's buffer."""

    def __init__(self, client: "NBDClient"):
        self.client = client
        self.stage = bytearray(codec.SIMPLE_REPLY_SIZE)
        self.stage_pos = 0
        self.target: _Pending | None = None
        self.target_pos = 0
        self.paused = False
        self.resume = asyncio.Event()
        self.resume.set()
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int):
        if self.target is not None:
            return memoryview(self.target.buf)[self.target_pos:]
        return memoryview(self.stage)[self.stage_pos:]

    def buffer_updated(self, n: int) -> None:
        if self.target is not None:
            self.target_pos += n
            if self.target_pos == len(self.target.buf):
                p, self.target = self.target, None
                self.client._complete(p, None)
            return
        self.stage_pos += n
        if self.stage_pos < len(self.stage):
            return
        self.stage_pos = 0
        try:
            hdr = codec.decode_reply_header(bytes(self.stage))
            if hdr.structured:
                raise ProtocolError("structured reply received but never negotiated")
        except ProtocolError as exc:
            log.error("%s: %s; dropping connection", self.client.name, exc)
            self.client._transport.abort()
            return
        p = self.client._pending.get(hdr.cookie)
        if p is None:
            log.error("%s: reply for unknown cookie %d; dropping connection", self.client.name, hdr.cookie)
            self.client._transport.abort()
            return
        if hdr.error:
            self.client._complete(p, OSError(hdr.error, f"{self.client.name}: server error {hdr.error}: "
                                                        f"{errno.errorcode.get(hdr.error, '?')}"))
        elif p.read_len:
            p.buf = bytearray(p.read_len)
            self.target, self.target_pos = p, 0
        else:
            self.client._complete(p, None)

    def pause_writing(self) -> None:
        self.resume.clear()

    def resume_writing(self) -> None:
        self.resume.set()

    def connection_lost(self, exc) -> None:
        self.resume.set()
        if not self.lost.done():
            self.lost.set_result(exc)

    def eof_received(self):
        return False


class NBDClient:
    """One connection to one export. Create with `await NBDClient.connect(...)`."""

    def __init__(self, host: str, port: int, export: str, tls: ssl.SSLContext | None,
                 server_hostname: str | None, timeout: float, reconnect_attempts: int,
                 verify: Verify | None = None, on_lost: OnLost | None = None, epoch: int | None = None):
        self.host, self.port, self.export = host, port, export
        self.epoch = epoch
        self.name = f"{host}:{port}/{export}"
        self._tls = tls
        self._server_hostname = server_hostname
        self.timeout = timeout
        self.reconnect_attempts = reconnect_attempts
        self.info = ExportInfo()
        self._pending: dict[int, _Pending] = {}
        self._cookie = 0
        self._transport: asyncio.Transport | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._proto: _ReplyProtocol | None = None
        self._reconnecting: asyncio.Task | None = None
        self._closed = False
        self.reconnects = 0
        self.verify = verify
        self.on_lost = on_lost
        self._acks = 0                                # cached writes acknowledged so far
        self._unflushed: deque[list[int]] = deque()  # [newest ack, offset, length], ack order
        self._flush_error: WritesLost | None = None

    # ------------------------------------------------------------ properties
    @property
    def size(self) -> int:
        return self.info.size

    def _has(self, flag: int) -> bool:
        return bool(self.info.flags & flag)

    @property
    def read_only(self) -> bool:
        return self._has(TransmissionFlag.READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._has(TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._has(TransmissionFlag.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._has(TransmissionFlag.SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return self._has(TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return self._has(TransmissionFlag.CAN_MULTI_CONN)

    # ------------------------------------------------------------ connect
    @classmethod
    async def connect(cls, host: str, port: int, export: str = "", *, tls_dir: str | None = None,
                      tls_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                      timeout: float = 30.0, reconnect_attempts: int = 3, verify: Verify | None = None,
                      on_lost: OnLost | None = None, epoch: int | None = None) -> "NBDClient":
        """`verify` and `on_lost`: see the module docstring (reconnects only);
        `epoch`: declared on every connection (EpochRefused when refused)."""
        if tls_dir and tls_context is None:
            from opie.nbd import tls as _tls
            tls_context = _tls.client_context(tls_dir)
        if epoch is not None:
            codec.encode_epoch(epoch)  # ValueError now for an epoch out of range
        self = cls(host, port, export, tls_context, server_hostname, timeout, reconnect_attempts,
                   verify, on_lost, epoch)
        try:
            await asyncio.wait_for(self._connect(), timeout)
        except asyncio.TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"{self.name}: handshake timed out after {timeout}s") from None
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            # e.g. the server closed after a refused TLS client certificate
            raise OSError(errno.ECONNRESET, f"{self.name}: server closed the connection during "
                                            f"the handshake ({exc.__class__.__name__})") from None
        return self

    async def _connect(self, reconnect: bool = False) -> None:
        reader, writer, no_zeroes = await _open(self.host, self.port, self._tls, self._server_hostname)
        try:
            if self.epoch is not None:
                await self._declare_epoch(reader, writer)
            writer.write(codec.encode_option(Option.GO, codec.encode_info_request(self.export, (Info.BLOCK_SIZE,))))
            await writer.drain()
            info = ExportInfo()
            while True:
                hdr, data = await _read_option_reply(reader)
                if hdr.reply == Reply.INFO:
                    codec.decode_info_reply(data, info)
                elif hdr.reply == Reply.ACK:
                    break
                elif hdr.reply == Reply.ERR_UNSUP:  # old server: fall back to EXPORT_NAME
                    writer.write(codec.encode_option(Option.EXPORT_NAME, self.export.encode()))
                    await writer.drain()
                    raw = await reader.readexactly(10 if no_zeroes else 134)
                    info.size, info.flags = codec.decode_export_name_reply(raw)
                    break
                else:
                    raise _reply_error(Option.GO, hdr.reply, data)
            if self.info.size and info.size != self.info.size:
                raise ExportChanged(f"{self.name}: export size changed from {self.info.size} to {info.size}")
            if reconnect and self.verify is not None:
                await self.verify(lambda offset, length: _read_before_transmission(reader, writer, offset, length))
            self.info = info
        except ProtocolError as exc:
            writer.close()
            raise OSError(errno.EPROTO, f"{self.name}: {exc}") from None
        except BaseException:
            writer.close()
            raise
        transport = writer.transport
        proto = _ReplyProtocol(self)
        leftover = bytes(reader._buffer)
        reader._buffer.clear()
        if leftover:
            raise OSError(errno.EPROTO, f"{self.name}: server sent data before any request")
        transport.set_protocol(proto)
        transport.resume_reading()
        # Keep the StreamWriter alive: its __del__ would close the transport.
        self._transport, self._proto, self._writer = transport, proto, writer
        proto.lost.add_done_callback(lambda f, p=proto: self._on_lost(p))
        log.debug("%s: connected (%d bytes, flags %#x)", self.name, info.size, info.flags)

    async def _declare_epoch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(codec.encode_option(OPT_OPIE_EPOCH, codec.encode_epoch(self.epoch)))
        await writer.drain()
        hdr, data = await _read_option_reply(reader)
        if hdr.option != OPT_OPIE_EPOCH:
            raise ProtocolError(f"reply to {codec.option_name(hdr.option)}, expected NBD_OPT_OPIE_EPOCH")
        if hdr.reply != Reply.ACK:
            why = data.decode("utf-8", "replace") or codec.reply_name(hdr.reply)
            raise EpochRefused(f"{self.name}: epoch {self.epoch} refused: {why}")

    def _on_lost(self, proto: _ReplyProtocol) -> None:
        if proto is not self._proto or self._closed:
            return
        self._transport = None
        if self._pending and self._reconnecting is None:
            self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.1
        try:
            for attempt in range(1, self.reconnect_attempts + 1):
                try:
                    await asyncio.wait_for(self._connect(reconnect=True), self.timeout)
                except (ExportChanged, EpochRefused) as exc:
                    log.error("%s: refusing the export after a reconnect: %s", self.name, exc)
                    self._fail_pending(exc)
                    return
                except (OSError, asyncio.TimeoutError, EOFError, asyncio.IncompleteReadError) as exc:
                    log.warning("%s: reconnect %d/%d failed: %s", self.name, attempt, self.reconnect_attempts, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 3, 2.0)
                    continue
                self.reconnects += 1
                self._writes_lost()
                log.info("%s: reconnected; re-sending %d request(s)", self.name, len(self._pending))
                for p in list(self._pending.values()):
                    self._send(p)
                return
            self._fail_pending(OSError(errno.ECONNRESET, f"{self.name}: connection lost"))
        finally:
            self._reconnecting = None

    def _fail_pending(self, err: OSError) -> None:
        for p in list(self._pending.values()):
            self._complete(p, err)

    def _writes_lost(self) -> None:
        """After a reconnect: cached writes acknowledged on the old connection
        and not flushed are lost (see the module docstring)."""
        if not self._unflushed:
            return
        ranges = [(offset, length) for _, offset, length in self._unflushed]
        self._unflushed.clear()
        err = WritesLost(f"{self.name}: {len(ranges)} range(s), {sum(n for _, n in ranges)} bytes, written "
                         "without FUA and not flushed when the connection was lost may be lost")
        log.error("%s", err)
        if self.on_lost is not None:
            try:
                self.on_lost(ranges)
            except Exception:  # the caller's bug must not strand the requests waiting here
                log.exception("%s: on_lost hook failed", self.name)
        flushes = [p for p in self._pending.values() if p.command == Command.FLUSH]
        for p in flushes:
            self._complete(p, err)
        if not flushes:
            self._flush_error = err

    def _acknowledged(self, p: _Pending) -> None:
        """Track what a successful reply leaves in the server's cache, and what a FLUSH made durable."""
        if p.command == Command.FLUSH:
            while self._unflushed and self._unflushed[0][0] <= p.flush_mark:
                self._unflushed.popleft()
        elif p.command in _CACHED and not p.flags & CommandFlag.FUA:
            self._acks += 1
            last = self._unflushed[-1] if self._unflushed else None
            if last is not None and last[1] <= p.offset <= last[1] + last[2]:  # sequential: extend
                last[0] = self._acks
                last[2] = max(last[1] + last[2], p.offset + p.length) - last[1]
            else:
                self._unflushed.append([self._acks, p.offset, p.length])

    # ------------------------------------------------------------ requests
    def _complete(self, p: _Pending, exc: BaseException | None) -> None:
        self._pending.pop(p.cookie, None)
        if p.future.done():
            return
        if exc is not None:
            p.future.set_exception(exc)
        else:
            self._acknowledged(p)
            p.future.set_result(p.buf)  # READ: the request's own bytearray, no copy

    def _send(self, p: _Pending) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return  # the reconnect task re-sends it
        if not p.payload:
            t.write(p.header)
        elif self._tls is not None:
            # one write: over TLS two writes would be two records and two sends
            t.write(b"".join((p.header, p.payload)))
        else:
            # plain: the transport sends at once and copies only what the
            # socket does not take, so the payload is never copied here
            t.write(p.header)
            t.write(p.payload)

    async def _request(self, type_: int, flags: int, offset: int, length: int,
                       payload: bytes | memoryview | None = None, read_len: int = 0):
        if self._closed:
            raise OSError(errno.ESHUTDOWN, f"{self.name}: client is closed")
        proto = self._proto
        if proto is not None and not proto.resume.is_set():
            await proto.resume.wait()
        self._cookie += 1
        cookie = self._cookie
        fut = asyncio.get_running_loop().create_future()
        p = _Pending(cookie, codec.encode_request(flags, type_, cookie, offset, length), payload, read_len, fut,
                     type_, flags, offset, length, flush_mark=self._acks)
        self._pending[cookie] = p
        if self._transport is None and self._reconnecting is None:
            self._reconnecting = asyncio.ensure_future(self._reconnect())
        self._send(p)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except asyncio.TimeoutError:
            self._pending.pop(cookie, None)
            fut.cancel()
            if self._transport is not None:
                self._transport.abort()  # a stuck server: start over on a new connection
            raise OSError(errno.ETIMEDOUT, f"{self.name}: {Command(type_).name} at {offset}+{length} "
                                           f"timed out after {self.timeout}s") from None

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """`length` bytes at `offset`: a fresh bytearray the caller owns (bytes when
        the read spans several requests)."""
        out = []
        while length:
            n = min(length, MAX_PAYLOAD)
            out.append(await self._request(Command.READ, 0, offset, n, read_len=n))
            offset += n
            length -= n
        return out[0] if len(out) == 1 else b"".join(out)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, f"{self.name}: export is read-only")
        mv = memoryview(data)
        flags = CommandFlag.FUA if fua else 0
        while mv:
            n = min(len(mv), MAX_PAYLOAD)
            await self._request(Command.WRITE, flags, offset, n, mv[:n])
            offset += n
            mv = mv[n:]

    async def flush(self) -> None:
        """Every write acknowledged before this call is durable on return;
        `WritesLost` (EIO, once) when some may have died with a lost connection."""
        err, self._flush_error = self._flush_error, None
        if err is not None:
            raise err
        await self._request(Command.FLUSH, 0, 0, 0)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._request(Command.TRIM, CommandFlag.FUA if fua else 0, offset, length)

    async def write_zeroes(self, offset: int, length: int, fua: bool = False, may_trim: bool = True) -> None:
        flags = (CommandFlag.FUA if fua else 0) | (0 if may_trim else CommandFlag.NO_HOLE)
        await self._request(Command.WRITE_ZEROES, flags, offset, length)

    def abort(self) -> None:
        """Stop at once (a demoted head stops writing): the connection is
        dropped without DISC, every pending request fails with ESHUTDOWN, and
        nothing is sent or re-sent from now on. Loop-only; never waits."""
        if self._closed:
            return
        self._closed = True
        if self._reconnecting:
            self._reconnecting.cancel()
        t, self._transport = self._transport, None
        if t is not None:
            t.abort()
        self._fail_pending(OSError(errno.ESHUTDOWN, f"{self.name}: aborted"))

    async def close(self) -> None:
        """Wait for in-flight requests (bounded by the timeout), send DISC, close."""
        if self._closed:
            return
        if self._pending:
            await asyncio.wait([p.future for p in self._pending.values()], timeout=self.timeout)
        self._closed = True
        if self._reconnecting:
            self._reconnecting.cancel()
        t = self._transport
        if t is not None and not t.is_closing():
            self._cookie += 1
            t.write(codec.encode_request(0, Command.DISC, self._cookie, 0, 0))
            t.close()
        self._transport = None
