"""The member interface and the two members that need no network.

A member is any block device with `size`, `name`, and async `read`, `write`
(with FUA) and `flush`. Errors are `OSError` with `.errno`; the array treats
an `OSError` from a member as that member failing. `nbd.client.NBDClient`
satisfies the same protocol, so raid5 never imports it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Protocol, runtime_checkable

from opie.fileio import pwrite_all

log = logging.getLogger(__name__)


@runtime_checkable
class Member(Protocol):
    """Durability contract: data written with `fua=True` is stable when the call
    returns; other writes are stable once a later `flush()` returns."""

    size: int
    name: str

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...

    async def flush(self) -> None: ...


class MemoryMember:
    """A member held in a bytearray.

    With `volatile=True` it models a disk with a write-back cache: reads see
    every write, but `power_loss()` keeps only what was flushed or written with
    FUA, plus a random subset of the unflushed writes (in issue order).
    """

    def __init__(self, size: int, name: str = "mem", volatile: bool = False) -> None:
        self.size = size
        self.name = name
        self.data = bytearray(size)
        self.volatile = volatile
        self._stable = bytearray(size) if volatile else None
        self._unflushed: list[tuple[int, bytes, bool]] = []

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(22, f"{self.name}: I/O beyond end ({offset}+{length} > {self.size})")

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(memoryview(self.data)[offset:offset + length])

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._check(offset, len(data))
        self.data[offset:offset + len(data)] = data
        if self._stable is not None:
            if fua:
                self._stable[offset:offset + len(data)] = data
            if self._unflushed or not fua:
                self._unflushed.append((offset, bytes(data), fua))

    async def flush(self) -> None:
        if self._stable is not None:
            for offset, data, _ in self._unflushed:
                self._stable[offset:offset + len(data)] = data
            self._unflushed.clear()

    def power_loss(self, rng: random.Random | None = None, keep: float = 0.5) -> None:
        """Drop the cache: reads afterwards see only what reached stable storage
        (FUA writes, and each unflushed write with probability `keep`; a write
        never lands over a later FUA write)."""
        if self._stable is None:
            return
        rng = rng or random.Random(0)
        for offset, data, fua in self._unflushed:
            if fua or rng.random() < keep:
                self._stable[offset:offset + len(data)] = data
        self._unflushed.clear()
        self.data[:] = self._stable


class FileMember:
    """A member backed by a file or block device: pread/pwrite in a thread,
    `flush` is fsync and FUA is write followed by fdatasync."""

    def __init__(self, path: str, size: int | None = None, name: str | None = None) -> None:
        self.path = path
        self.name = name or os.path.basename(path)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if size is not None and os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self.size = size if size is not None else os.lseek(self._fd, 0, os.SEEK_END)

    async def read(self, offset: int, length: int) -> bytes:
        data = await asyncio.to_thread(os.pread, self._fd, length, offset)
        if len(data) != length:
            raise OSError(5, f"{self.name}: short read at {offset}")
        return data

    def _write_sync(self, offset: int, data: bytes, fua: bool) -> None:
        pwrite_all(self._fd, data, offset)
        if fua:
            os.fdatasync(self._fd)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await asyncio.to_thread(self._write_sync, offset, data, fua)

    async def flush(self) -> None:
        await asyncio.to_thread(os.fsync, self._fd)

    def close(self) -> None:
        os.close(self._fd)
