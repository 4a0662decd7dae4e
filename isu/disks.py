"""The disks an ISU owns and their state.

A disk is given as `PATH[:SIZE]`: a regular file (created sparse at SIZE when
missing) or a block device. It is exported under the file's stem (`disk0.img`
-> `disk0`). An existing file is never resized or truncated: a SIZE that
disagrees with it is refused. A disk whose I/O fails with EIO is marked
failed and keeps answering EIO to every request (read, write, flush, trim,
write-zeroes, cache; it is not silently retried into service).
"""
from __future__ import annotations

import enum
import errno
import logging
import os
import re
import stat
from dataclasses import dataclass

from opie.nbd.export import FileExport

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B?)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class DiskState(enum.Enum):
    ONLINE = "online"
    FAILED = "failed"


class DiskError(Exception):
    """A disk specification or disk that cannot be served; nothing was changed."""


def parse_size(text: str) -> int:
    """'2G' -> 2147483648. Binary units (K, M, G, T; 'GiB'/'GB' alike)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise DiskError(f"invalid size {text!r} (examples: 512M, 2G, 1T)")
    n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n <= 0:
        raise DiskError(f"size must be positive, got {text!r}")
    return n


@dataclass(frozen=True)
class DiskSpec:
    path: str
    size: int | None

    @classmethod
    def parse(cls, text: str) -> "DiskSpec":
        path, sep, size = text.rpartition(":")
        if not sep or "/" in size or not size:
            return cls(text, None)
        return cls(path, parse_size(size))

    @property
    def name(self) -> str:
        base = os.path.basename(self.path)
        stem = base.split(".", 1)[0] if not base.startswith(".") else base
        return stem


class Disk(FileExport):
    """One served disk: a FileExport that tracks its state."""

    def __init__(self, spec: DiskSpec):
        name = spec.name
        if not EXPORT_NAME.fullmatch(name):
            raise DiskError(f"{spec.path}: export name {name!r} must be 1-64 of [A-Za-z0-9._-]")
        path = spec.path
        if os.path.exists(path):
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode):
                if spec.size is not None and st.st_size != spec.size:
                    raise DiskError(f"{path} exists with {st.st_size} bytes but {spec.size} were asked; "
                                    "refusing to resize a disk")
            elif not stat.S_ISBLK(st.st_mode):
                raise DiskError(f"{path} is neither a regular file nor a block device")
        else:
            if spec.size is None:
                raise DiskError(f"{path} does not exist; give a size to create it (PATH:SIZE)")
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise DiskError(f"{path}: directory {parent} does not exist")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, spec.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            log.info("created sparse disk %s of %d bytes", path, spec.size)
        try:
            super().__init__(path, name, description=f"ISU disk {os.path.abspath(path)}")
        except OSError as exc:
            raise DiskError(f"{path}: cannot open: {exc.strerror}") from None
        self.state = DiskState.ONLINE
        self.errors = 0

    def _failed(self, exc: OSError) -> None:
        self.errors += 1
        if exc.errno == errno.EIO and self.state is DiskState.ONLINE:
            self.state = DiskState.FAILED
            log.error("disk %s (%s) failed: %s", self.name, self.path, exc)

    async def _guard(self, coro):
        if self.state is DiskState.FAILED:
            coro.close()
            raise OSError(errno.EIO, f"disk {self.name} has failed")
        try:
            return await coro
        except OSError as exc:
            self._failed(exc)
            raise

    async def read(self, offset, length):
        return await self._guard(super().read(offset, length))

    def sendfile_fd(self):
        return None if self.state is DiskState.FAILED else super().sendfile_fd()

    def read_now(self, offset, length):
        if self.state is DiskState.FAILED:
            raise OSError(errno.EIO, f"disk {self.name} has failed")
        try:
            return super().read_now(offset, length)
        except OSError as exc:
            self._failed(exc)
            raise

    def io_error(self, exc):
        self._failed(exc)

    async def write(self, offset, data, fua=False):
        return await self._guard(super().write(offset, data, fua))

    async def flush(self):
        return await self._guard(super().flush())

    async def trim(self, offset, length, fua=False):
        return await self._guard(super().trim(offset, length, fua))

    async def write_zeroes(self, offset, length, fua=False, may_trim=True):
        return await self._guard(super().write_zeroes(offset, length, fua, may_trim))

    async def cache(self, offset, length):
        return await self._guard(super().cache(offset, length))

    def status(self) -> dict:
        return {"name": self.name, "path": os.path.abspath(self.path), "size": self.size,
                "state": self.state.value, "errors": self.errors,
                "kind": "block" if self.is_block else "file"}
