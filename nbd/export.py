"""What the NBD server serves: the `Export` interface and a file-backed export.

An export is a byte range with async operations. The server validates every
request (range, flags, read-only) before it reaches an export, so an export
only ever sees in-range, permitted operations.

Durability contract of `FileExport`: `write(..., fua=True)` returns after the
data is on stable storage (pwrite + fdatasync); `flush()` makes every write
that completed before it was called stable (fdatasync of the shared file), on
any connection. That is what makes CAN_MULTI_CONN true for it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import asyncio

from opie.fileio import pwrite_all

log = logging.getLogger(__name__)


@runtime_checkable
class Export(Protocol):
    """A named byte range the server can serve.

    Methods are called from the server's event loop, possibly concurrently
    for different requests; they raise `OSError` with an errno on failure
    (the server sends that errno, mapped to the spec's set, to the client).
    `write` must not keep a reference to `data` once it returns: the server
    reuses the buffer for the next request.

    Optional, for file-backed exports: `sendfile_fd()` returns a file
    descriptor the server may answer READs from with os.sendfile (or None),
    `read_now(offset, length)` reads synchronously, and `io_error(exc)` is
    told about an I/O error the export did not see itself. `splice_fd()`
    returns a descriptor the server may write checked, in-range WRITE
    payloads into from another thread (with splice(2)), or None; a write
    that fails there is reported through `io_error`.
    """

    name: str
    description: str
    size: int
    read_only: bool
    can_multi_conn: bool  # flush on one connection covers writes done on all
    can_trim: bool
    can_zero: bool

    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...
    async def flush(self) -> None: ...
    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...
    async def write_zeroes(self, offset: int, length: int, fua: bool = False, may_trim: bool = True) -> None: ...
    async def cache(self, offset: int, length: int) -> None: ...


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
POSIX_FADV_WILLNEED = 3

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def device_size(fd: int) -> int:
    """Size in bytes of an open regular file or block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("Q", buf)[0]
    return st.st_size


class FileExport:
    """An export backed by a regular file or a block device.

    Syscalls on a block device run in a small thread pool shared by all file
    exports of the process, so one slow disk never stalls the event loop;
    on a regular file they run inline (see `inline`). fdatasync (FLUSH, and
    FUA after its write) always runs in the pool: it waits for the disk, and
    on the loop it would stall every other connection the loop serves.
    Ordering: it starts only after the writes it must cover have returned
    (inline, or awaited in the pool), so a FLUSH covers every write
    acknowledged before it arrived.
    """

    _pool: ThreadPoolExecutor | None = None
    thread_safe = True  # positional syscalls only: any thread or loop may call it

    def __init__(self, path: str, name: str, read_only: bool = False, description: str = "",
                 inline: bool | None = None):
        self.path = path
        self.name = name
        self.description = description
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        self.fd = os.open(path, flags | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.size = device_size(self.fd)
        # Regular files are served through the page cache: a syscall there
        # costs microseconds, less than a hand-off to a thread, so it runs on
        # the loop. Block devices wait on hardware: those go to threads.
        self.inline = (not self.is_block) if inline is None else inline
        self.can_multi_conn = True
        self.can_trim = not read_only
        self.can_zero = not read_only
        if FileExport._pool is None:
            FileExport._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="nbd-file")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def _run(self, fn, *args):
        if self.inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # a file shrunk under us: report, never pad silently
            raise OSError(errno.EIO, f"short read at {offset}: {len(data)} of {length}")
        return data

    async def read(self, offset: int, length: int) -> bytes:
        return await self._run(self._pread, offset, length)

    def sendfile_fd(self) -> int | None:
        """The fd READs may be sent from with os.sendfile: regular files served
        inline only (a block device read could stall the loop)."""
        return self.fd if self.inline and not self.is_block and self.fd >= 0 else None

    def splice_fd(self) -> int | None:
        """The fd WRITE payloads may be spliced into, from any thread: that of
        `sendfile_fd()` (so a subclass refusing it, e.g. a failed disk,
        refuses this too) when the export is writable."""
        return None if self.read_only else self.sendfile_fd()

    def read_now(self, offset: int, length: int) -> bytes:
        return self._pread(offset, length)

    def io_error(self, exc: OSError) -> None:
        log.error("%s: %s", self.name, exc)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._run(pwrite_all, self.fd, data, offset)
        if fua:
            await self._sync()

    async def flush(self) -> None:
        await self._sync()

    async def _sync(self) -> None:
        """fdatasync in the pool, never on the loop (see the class docstring)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, os.fdatasync, self.fd)

    def _discard(self, offset: int, length: int, zero: bool) -> None:
        if self.is_block:
            req = BLKZEROOUT if zero else BLKDISCARD
            fcntl.ioctl(self.fd, req, struct.pack("QQ", offset, length))
            return
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS) or not zero:
                raise
            self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        while length:
            n = min(length, len(chunk))
            pwrite_all(self.fd, chunk[:n], offset)
            offset += n
            length -= n

    def _zero(self, offset: int, length: int, may_trim: bool) -> None:
        if may_trim:
            self._discard(offset, length, zero=True)
        elif self.is_block:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        else:
            try:
                _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._write_zeros(offset, length)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._run(self._discard, offset, length, False)
        if fua:
            await self._sync()

    async def write_zeroes(self, offset: int, length: int, fua: bool = False, may_trim: bool = True) -> None:
        await self._run(self._zero, offset, length, may_trim)
        if fua:
            await self._sync()

    async def cache(self, offset: int, length: int) -> None:
        await self._run(os.posix_fadvise, self.fd, offset, length, POSIX_FADV_WILLNEED)
