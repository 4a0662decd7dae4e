"""WRITE payloads moved socket -> pipe -> file with splice(2), off the event loop.

One `PayloadSplicer` per plain-TCP (or Unix) connection. While the server has
paused the transport's reading, `receive()` moves one payload from the socket
into the export's file in the splicer's own thread: no copy through user
space and the GIL released, so payloads of several connections land in
parallel with the event loops. Never for TLS (the socket carries records, not
payload bytes).

Contract of `receive(file_fd, offset, head, length, fua)`:

- it consumes exactly `length - len(head)` bytes from the socket (the caller
  has already taken `head`, the payload's first bytes, out of its buffer) and
  writes `head` + those bytes at `offset`; nothing outside
  `[offset, offset + length)` is ever written;
- a failing file write or fdatasync does not stop it: the rest of the payload
  is still consumed (and discarded) so the stream stays in step, and the
  `OSError` is returned (None on success); with `fua` the data is on stable
  storage when it returns None;
- end of stream or a socket error inside the payload raises `PayloadEnded`
  (the connection must close; the part already received may be written);
- `close()` (or cancelling the awaiting task) makes a running receive raise
  `PayloadEnded` promptly, even when the client has stalled mid-payload or
  keeps the socket full: after `close()` no more than the piece being moved
  (at most one pipe's worth) reaches the file, and a receive not yet started
  writes nothing. A cancelled `run` returns only once the thread has left the
  job (bounded by ABORT_TIMEOUT), so an ended session (a fence, a removed
  export) leaves no payload still being written behind it.

Between payloads, `peek(n)` and `take(n)` let the thread look at and consume
the next request header itself, so a run of WRITEs is received without going
back to the event loop for each one.

The splicer works on its own dup of the socket descriptor, so the transport
closing the socket can never make it read a recycled descriptor number. It
never changes the descriptor's flags (O_NONBLOCK is shared with the transport).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import logging
import os
import queue
import select
import socket
import threading

from opie.fileio import pwrite_all

log = logging.getLogger(__name__)

SPLICE_MIN = 64 * 1024  # payload bytes still in the socket worth a hand-off to the splicer
PIPE_SIZE = 1 << 20  # asked for with F_SETPIPE_SZ; the kernel may grant less
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FROM_SOCKET = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_POLL_SOCKET = select.POLLIN | select.POLLHUP | select.POLLERR
ABORT_TIMEOUT = 5.0  # a cancelled run waits this long for the thread to leave the job


class PayloadEnded(ConnectionError):
    """The payload could not be received in full: EOF, socket error or close()."""


def available() -> bool:
    """True where os.splice exists (Linux, Python 3.10+)."""
    return hasattr(os, "splice") and hasattr(os, "eventfd")


class PayloadSplicer:
    """Receives WRITE payloads of one connection with splice(2).

    `run` may be called from the connection's event loop only, one job at a
    time (the stream is sequential); the blocking work runs in the splicer's
    own daemon thread (never joined at exit: a client stalled mid-payload
    cannot hold up the process). `close()` is idempotent and leaves no thread
    or descriptor behind once a running receive has returned."""

    def __init__(self, sock_fd: int, peer: str):
        self.peer = peer
        self._sock = os.dup(sock_fd)
        self._sock_obj = socket.socket(fileno=self._sock)  # for recv flags; owns the dup
        fds: list[int] = []
        try:
            self._pipe_r, self._pipe_w = os.pipe2(os.O_CLOEXEC)
            fds += [self._pipe_r, self._pipe_w]
            try:
                fcntl.fcntl(self._pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError as exc:  # above /proc/sys/fs/pipe-max-size: keep the default
                log.debug("%s: pipe stays at its default size: %s", peer, exc)
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fds.append(self._wake)
            self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            for fd in fds:
                os.close(fd)
            self._sock_obj.close()
            raise
        self._poll = select.poll()
        self._poll.register(self._sock, _POLL_SOCKET)
        self._poll.register(self._wake, select.POLLIN)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve_jobs, name=f"nbd-splice {peer}", daemon=True)
        self._thread.start()

    async def run(self, fn, *args):
        """Run `fn(*args)` (which calls `receive`, `peek`, `take`) in the
        splicer's thread; cancelling the caller closes the splicer (the
        stream is out of step from then on)."""
        if self._closed:
            raise PayloadEnded("splicer closed")
        job: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, fn, args))
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            self.close()
            if not job.cancel():  # running: wait until the thread stops writing
                ended = asyncio.wrap_future(job)
                ended.add_done_callback(lambda f: f.cancelled() or f.exception())  # its PayloadEnded is expected
                await asyncio.wait([ended], timeout=ABORT_TIMEOUT)
            raise

    def close(self) -> None:
        """Stop a running receive and release the thread and descriptors."""
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._wake, 1)
        self._jobs.put(None)  # the thread closes the descriptors after any job in progress

    # -- in the splicer's thread
    def _serve_jobs(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, fn, args = item
            if not job.set_running_or_notify_cancel():
                continue
            try:
                job.set_result(fn(*args))
            except BaseException as exc:  # handed to the awaiting task
                job.set_exception(exc)
        for fd in (self._pipe_r, self._pipe_w, self._wake, self._null):
            os.close(fd)
        self._sock_obj.close()

    def receive(self, file_fd: int, offset: int, head: bytes, length: int, fua: bool) -> OSError | None:
        """Blocking; see the module docstring for the contract."""
        error: OSError | None = None
        if self._closed:
            raise PayloadEnded("connection closing")
        if head:
            error = _pwrite_all(file_fd, head, offset)
        pos, left = offset + len(head), length - len(head)
        while left:
            if self._closed:  # a socket kept full never makes _wait look at the wake-up
                raise PayloadEnded("connection closing")
            n = self._from_socket(left)
            left -= n
            if error is None:
                try:
                    self._to_file(file_fd, n, pos)
                    pos += n
                    continue
                except OSError as exc:
                    error = exc
            self._discard(n)
        if fua and error is None:
            try:
                os.fdatasync(file_fd)
            except OSError as exc:
                error = exc
        return error

    def peek(self, n: int) -> bytes | None:
        """The next n bytes waiting in the socket, left there; None when
        fewer are waiting right now (or the stream ended)."""
        try:
            data = self._sock_obj.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError included
            return None
        return data if len(data) == n else None

    def take(self, n: int) -> bytes:
        """Consume n bytes that `peek(n)` has just seen."""
        data = self._sock_obj.recv(n, socket.MSG_DONTWAIT)
        if len(data) != n:
            raise PayloadEnded(f"{n} bytes seen in the socket, {len(data)} received")
        return data

    def _from_socket(self, most: int) -> int:
        """Splice 1..most bytes from the socket into the (empty) pipe."""
        while True:
            try:
                n = os.splice(self._sock, self._pipe_w, most, flags=_FROM_SOCKET)
            except BlockingIOError:
                self._wait()
                continue
            except OSError as exc:
                raise PayloadEnded(f"socket error inside a WRITE payload: {exc}") from None
            if n == 0:
                raise PayloadEnded("end of stream inside a WRITE payload")
            return n

    def _wait(self) -> None:
        while True:
            events = dict(self._poll.poll())
            if self._wake in events:
                raise PayloadEnded("connection closing")
            if events.get(self._sock):
                return

    def _to_file(self, fd: int, n: int, pos: int) -> None:
        """Move all n bytes in the pipe to fd at pos. On error the bytes not
        written stay in the pipe (the caller discards them)."""
        while n:
            done = os.splice(self._pipe_r, fd, n, offset_dst=pos)
            if done == 0:
                raise OSError(errno.EIO, f"splice into the file wrote nothing at {pos}")
            n -= done
            pos += done

    def _discard(self, n: int) -> None:
        """Drop what is in the pipe (at most n bytes; fewer after a partial file write)."""
        while n:
            try:
                done = os.splice(self._pipe_r, self._null, n, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                return  # the pipe is empty: the rest did reach the file
            if done == 0:
                return
            n -= done


def _pwrite_all(fd: int, data: bytes, offset: int) -> OSError | None:
    try:
        pwrite_all(fd, data, offset)
    except OSError as exc:
        return exc
    return None
