"""The passive head's warm copy of the mapping table (DESIGN.md, "Two heads").

The active head's `MirrorSender` is the pool's commit hook
(`Pool.set_commit_hook`): every committed metadata transaction goes to the
passive head's `MirrorReceiver`, which persists it (`mirror_copy`) and only
then acknowledges; the commit returns after the acknowledgement. The
channel is TCP with mutual TLS from the cluster CA, and both ends require
the peer's certificate to be issued for role `head` (nbd.tls). Frames are
`mirror_frames`.

If the passive is gone or does not answer within `timeout`, the commit goes
on without it: the sender turns STALE (a callback says so; the daemon
records it in etcd) and keeps trying to reconnect. A passive that returns
first gets a full copy (every page), then whatever committed meanwhile,
then the sender is CURRENT again and commits wait for it.

At takeover the passive asks `MirrorReceiver.table_for(pool uuid, seq)` with
the generation of the pool on the array (`Pool.generation`): its copy if it
is exactly that state, else None (reload from the array).
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import ssl
import uuid as uuidlib
from collections.abc import Callable

from opie.head.ha import mirror_frames as mf
from opie.head.ha.errors import FrameError, MirrorError
from opie.head.ha.mirror_copy import MirrorCopy
from opie.head.volumes.core import MetadataCommit
from opie.nbd import tls

log = logging.getLogger(__name__)

MIRROR_PORT = 7870
HEAD_ROLE = "head"
TIMEOUT = 1.0          # a commit waits at most this long for the passive
FULL_TIMEOUT = 30.0    # for a full copy (not on any commit's path)
RETRY = 0.5            # between attempts to reach a lost passive
PING_INTERVAL = 1.0    # how often an idle sender checks the passive is there
FRAME_TIMEOUT = 30.0   # the receiver's bound for the rest of a frame once it started


class MirrorState(enum.Enum):
    """CURRENT: the passive has every committed transaction and commits wait
    for it. STALE: it may lack some (gone, slow, or catching up)."""

    CURRENT = "current"
    STALE = "stale"


async def read_frame(reader: asyncio.StreamReader,
                     rest_timeout: float | None = None) -> tuple[int, bytes]:
    """The next whole frame; FrameError if it fails a check, IncompleteReadError
    at EOF, TimeoutError if the frame started but its rest took `rest_timeout`."""
    head = await reader.readexactly(mf.HEADER_SIZE)
    rest = await asyncio.wait_for(reader.readexactly(mf.frame_length(head) - mf.HEADER_SIZE),
                                  rest_timeout)
    return mf.unframe(head + rest)


CHANNEL_ERRORS = (OSError, EOFError, MirrorError)   # timeouts, TLS and EOF included


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _role(writer: asyncio.StreamWriter) -> str | None:
    return tls.peer_role(writer.get_extra_info("peercert"))


def _abort(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort()


class MirrorReceiver:
    """The passive side: serves one sender at a time (a new connection
    replaces the older one) and keeps the copy in `state_dir`. Loop-only."""

    def __init__(self, state_dir: str | os.PathLike, tls_dir: str | os.PathLike) -> None:
        self.copy = MirrorCopy(state_dir)
        self._ssl = tls.server_context(tls_dir)
        self._server: asyncio.base_events.Server | None = None
        self._lock = asyncio.Lock()
        self._current: asyncio.StreamWriter | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int = MIRROR_PORT) -> int:
        """Listen on host:port (0: any free port); returns the port."""
        self._server = await asyncio.start_server(self._client, host, port, ssl=self._ssl,
                                                  reuse_address=True)
        bound = int(self._server.sockets[0].getsockname()[1])
        log.info("mirror receiver on %s:%d", host, bound)
        return bound

    async def close(self) -> None:
        """Stop listening and drop the sender (e.g. before a takeover)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        _abort(self._current)
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    @property
    def generation(self) -> tuple[uuidlib.UUID, int] | None:
        """(pool uuid, transaction) of the copy, or None if there is none."""
        return None if self.copy.pool_uuid is None else (self.copy.pool_uuid, self.copy.seq)

    def table_for(self, pool_uuid: uuidlib.UUID, seq: int) -> list[bytes] | None:
        """Every metadata page (in page order) if the copy is exactly pool
        `pool_uuid` at transaction `seq` (the generation on the array), else
        None: the copy cannot be used and the pool must be read from the array."""
        if self.generation != (pool_uuid, seq):
            log.info("mirror copy %s does not match the array's %s; reload", self.generation,
                     (pool_uuid, seq))
            return None
        return self.copy.table()

    def _reply(self, ok: bool, reason: str = "") -> bytes:
        return mf.Reply(ok, self.copy.pool_uuid or mf.NO_POOL, self.copy.seq, reason).frame()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        peer = writer.get_extra_info("peername")
        try:
            role = _role(writer)
            if role != HEAD_ROLE:
                log.warning("mirror: refused %s: certificate of role %s, not %s", peer, role,
                            HEAD_ROLE)
                return
            _abort(self._current)
            self._current = writer
            log.info("mirror: sender %s connected", peer)
            while True:
                await self._serve_one(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            log.info("mirror: sender %s gone: %s", peer, exc or "closed")
        except FrameError as exc:
            log.warning("mirror: refused a frame from %s and closed it: %s", peer, exc)
            writer.write(self._reply(False, str(exc)))
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except CHANNEL_ERRORS:
                pass
        except OSError as exc:
            log.warning("mirror: sender %s: %s", peer, _why(exc))
        finally:
            if self._current is writer:
                self._current = None
            if task is not None:
                self._clients.discard(task)
            _abort(writer)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one frame, do it, answer. FrameError for a bad frame (the copy unchanged)."""
        kind, payload = await read_frame(reader, FRAME_TIMEOUT)
        if kind not in (mf.FULL, mf.RECORD, mf.PING):
            raise FrameError(f"frame kind: expected FULL, RECORD or PING, got {kind}")
        if kind == mf.PING:
            if payload:
                raise FrameError(f"ping length: expected 0, got {len(payload)}")
            answer = self._reply(True)
        else:
            pages = mf.Pages.from_bytes(kind, payload)
            async with self._lock:
                try:
                    await asyncio.to_thread(self.copy.replace if kind == mf.FULL
                                            else self.copy.apply, pages)
                    answer = self._reply(True)
                except MirrorError as exc:
                    log.info("mirror: record refused: %s", exc)
                    answer = self._reply(False, str(exc))
        writer.write(answer)
        await writer.drain()


StateCallback = Callable[[MirrorState], None]


class MirrorSender:
    """The active side: the pool's commit hook, and a task that keeps the
    passive at host:port connected. Starts STALE; `on_state` (called on the
    loop, must not block) sees every change. Loop-only."""

    def __init__(self, host: str, port: int, tls_dir: str | os.PathLike, *,
                 on_state: StateCallback | None = None, timeout: float = TIMEOUT,
                 full_timeout: float = FULL_TIMEOUT, retry: float = RETRY,
                 ping_interval: float = PING_INTERVAL) -> None:
        self.host, self.port = host, port
        self._ssl = tls.client_context(tls_dir)
        self._on_state = on_state
        self.timeout, self.full_timeout = timeout, full_timeout
        self.retry, self.ping_interval = retry, ping_interval
        self.state = MirrorState.STALE
        self.pool_uuid = mf.NO_POOL
        self.seq = 0                          # the last transaction the pool committed
        self._acked = 0                       # the last one the passive acknowledged
        self._pages: dict[int, bytes] = {}
        self._changed: set[int] = set()       # pages changed since the last catch-up snapshot
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._io = asyncio.Lock()             # one exchange at a time on the connection
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, base: MetadataCommit) -> None:
        """Begin mirroring from `base` (what `Pool.set_commit_hook` returned)."""
        self.pool_uuid, self.seq, self._pages = base.pool_uuid, base.seq, dict(base.pages)
        self._task = asyncio.create_task(self._run(), name="mirror-sender")

    async def close(self) -> None:
        """Stop mirroring: STALE from now on (the hook then only keeps the
        active's own copy; remove it from the pool too)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._drop()
        self._set_state(MirrorState.STALE)

    async def on_commit(self, record: MetadataCommit) -> None:
        """The pool's commit hook: returns once the passive has persisted
        `record`, or at most `timeout` seconds later with the sender STALE.
        Raises only CancelledError (the sender is then STALE too), and
        MirrorError for a record of another pool (a caller's mistake)."""
        if record.pool_uuid != self.pool_uuid:
            raise MirrorError(f"record pool: expected {self.pool_uuid}, got {record.pool_uuid}")
        base = self.seq
        self._pages.update(record.pages)
        self._changed.update(record.pages)
        self.seq = record.seq
        if self.state is not MirrorState.CURRENT:
            return
        message = mf.Pages(self.pool_uuid, base, record.seq, dict(record.pages)).frame(mf.RECORD)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._io:
                    if self.state is MirrorState.CURRENT:
                        await self._exchange(message, record.seq)
        except asyncio.CancelledError:
            self._lose(f"transaction {record.seq}: the commit was cancelled")
            raise
        except CHANNEL_ERRORS as exc:
            self._lose(f"transaction {record.seq} not acknowledged: {_why(exc)}")

    # -- the connection --------------------------------------------------
    async def _exchange(self, message: bytes, seq: int) -> None:
        """Send one frame and wait for the ACK that says the copy is at `seq`."""
        if self._conn is None:
            raise MirrorError("not connected")
        reader, writer = self._conn
        writer.write(message)
        await writer.drain()
        reply = mf.Reply.from_bytes(*await read_frame(reader))
        if not reply.ok:
            raise MirrorError(f"passive refused: {reply.reason}")
        if (reply.pool_uuid, reply.seq) != (self.pool_uuid, seq):
            raise MirrorError(f"passive acknowledged {reply.pool_uuid} at {reply.seq}, "
                              f"expected {self.pool_uuid} at {seq}")
        self._acked = seq

    def _set_state(self, state: MirrorState) -> None:
        if state is self.state:
            return
        self.state = state
        if self._on_state is not None:
            self._on_state(state)

    def _drop(self) -> None:
        if self._conn is not None:
            _abort(self._conn[1])
            self._conn = None

    def _lose(self, why: str) -> None:
        """The passive is gone or behind: drop it, go STALE, let `_run` reconnect."""
        self._drop()
        if self.state is MirrorState.CURRENT:
            log.warning("mirror to %s:%d stale: %s", self.host, self.port, why)
        self._set_state(MirrorState.STALE)
        self._lost.set()

    async def _connect(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self._ssl,
                                    server_hostname=self.host), self.timeout)
        role = _role(writer)
        if role != HEAD_ROLE:
            _abort(writer)
            raise MirrorError(f"{self.host}:{self.port} has a certificate of role {role}, "
                              f"not {HEAD_ROLE}")
        self._conn = reader, writer

    async def _catch_up(self) -> None:
        """Send a full copy, then what committed during it, until the passive
        is at `seq`; then CURRENT (no await between that check and the change)."""
        full = mf.Pages(self.pool_uuid, 0, self.seq, dict(self._pages))
        self._changed.clear()
        async with asyncio.timeout(self.full_timeout):
            await self._exchange(full.frame(mf.FULL), full.seq)
        at = full.seq
        while at != self.seq:
            delta = mf.Pages(self.pool_uuid, at, self.seq, {p: self._pages[p] for p in self._changed})
            self._changed.clear()
            async with asyncio.timeout(self.full_timeout):
                await self._exchange(delta.frame(mf.RECORD), delta.seq)
            at = delta.seq
        self._lost.clear()
        self._set_state(MirrorState.CURRENT)
        log.info("mirror to %s:%d current at transaction %d", self.host, self.port, at)

    async def _ping(self) -> None:
        async with asyncio.timeout(self.timeout):
            async with self._io:
                if self.state is MirrorState.CURRENT:
                    await self._exchange(mf.frame(mf.PING, b""), self._acked)

    async def _run(self) -> None:
        """Keep the passive current: reconnect and catch up while STALE, ping while CURRENT."""
        while True:
            if self.state is MirrorState.CURRENT:
                try:
                    await asyncio.wait_for(self._lost.wait(), self.ping_interval)
                    continue
                except asyncio.TimeoutError:
                    pass
                try:
                    await self._ping()
                except CHANNEL_ERRORS as exc:
                    self._lose(f"no answer to a ping: {_why(exc)}")
                continue
            try:
                async with self._io:
                    await self._connect()
                    await self._catch_up()
            except CHANNEL_ERRORS as exc:
                log.debug("mirror to %s:%d: %s", self.host, self.port, _why(exc))
                self._drop()
                await asyncio.sleep(self.retry)
