"""The block-device interface the volume layer sits on and provides, and three
small devices: in memory, file-backed, and a crash simulator for tests.

A block device is anything with `size`, `async read(offset, length)`,
`async write(offset, data, fua=False)` and `async flush()`. A write returned
from is visible to reads; it is durable once a later `flush()` has returned,
or when it returns if it was written with `fua=True`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from typing import Protocol, runtime_checkable

from opie.fileio import pwrite_all


@runtime_checkable
class BlockDevice(Protocol):
    size: int

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...


def check_range(size: int, offset: int, length: int) -> None:
    """OSError(EINVAL) unless [offset, offset+length) lies inside [0, size)."""
    if offset < 0 or length < 0 or offset + length > size:
        raise OSError(errno.EINVAL, f"range {offset}+{length} outside device of {size} bytes")


class MemoryDevice:
    """A device in a bytearray; every write is durable at once."""

    def __init__(self, size: int, image: bytes | None = None) -> None:
        self.size = size
        self.buf = bytearray(image) if image is not None else bytearray(size)

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self.size, offset, length)
        return bytes(memoryview(self.buf)[offset:offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        check_range(self.size, offset, len(data))
        self.buf[offset:offset + len(data)] = data

    async def flush(self) -> None:
        return None


class FileDevice:
    """A device on a (sparse) file; I/O runs in worker threads, flush is fdatasync."""

    def __init__(self, path: str, size: int) -> None:
        self.size = size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)

    async def read(self, offset: int, length: int) -> bytes:
        check_range(self.size, offset, length)
        return await asyncio.to_thread(os.pread, self._fd, length, offset)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        check_range(self.size, offset, len(data))
        await asyncio.to_thread(self._pwrite, offset, data, fua)

    def _pwrite(self, offset: int, data: bytes, fua: bool) -> None:
        pwrite_all(self._fd, data, offset)
        if fua:
            os.fdatasync(self._fd)

    async def flush(self) -> None:
        await asyncio.to_thread(os.fdatasync, self._fd)

    def close(self) -> None:
        os.close(self._fd)


class SimulatedCrash(Exception):
    """Raised by CrashDevice at its armed operation and for every one after."""


class CrashDevice:
    """A volatile write cache over a durable image, for crash tests.

    Reads see every write. `flush()` makes all earlier writes durable; a
    `fua=True` write is durable by itself. `crash_image()` returns what a disk
    could hold after power loss: the durable image plus any subset of the
    unflushed writes (FUA ones always), applied in order, and possibly the
    write that was in flight torn at a 512-byte boundary. `fail_at=n` makes
    the n-th operation (0-based, reads excluded) raise SimulatedCrash before
    it completes; it and every later operation change nothing.
    """

    def __init__(self, size: int, image: bytes | None = None) -> None:
        self.size = size
        self.durable = bytearray(image) if image is not None else bytearray(size)
        self.volatile = bytearray(self.durable)
        self.pending: list[tuple[int, bytes, bool]] = []
        self.ops = 0
        self.fail_at: int | None = None
        self.crashed = False
        self.in_flight: tuple[int, bytes] | None = None

    def _tick(self, offset: int = 0, data: bytes = b"") -> None:
        if self.crashed:
            raise SimulatedCrash("device is gone")
        if self.fail_at is not None and self.ops >= self.fail_at:
            self.crashed = True
            self.in_flight = (offset, data) if data else None
            raise SimulatedCrash(f"crash at operation {self.ops}")
        self.ops += 1

    async def read(self, offset: int, length: int) -> bytes:
        if self.crashed:
            raise SimulatedCrash("device is gone")
        check_range(self.size, offset, length)
        return bytes(self.volatile[offset:offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        check_range(self.size, offset, len(data))
        self._tick(offset, bytes(data))
        self.volatile[offset:offset + len(data)] = data
        self.pending.append((offset, bytes(data), fua))

    async def flush(self) -> None:
        self._tick()
        for offset, data, _fua in self.pending:
            self.durable[offset:offset + len(data)] = data
        self.pending.clear()

    def crash_image(self, rng: random.Random, keep: float = 0.5, tear: bool = True) -> bytes:
        """A possible post-power-loss image (see the class docstring)."""
        image = bytearray(self.durable)
        for offset, data, fua in self.pending:
            if fua or rng.random() < keep:
                image[offset:offset + len(data)] = data
        if tear and self.in_flight is not None:
            offset, data = self.in_flight
            cut = rng.randrange(0, len(data) // 512 + 1) * 512
            image[offset:offset + cut] = data[:cut]
        return bytes(image)
