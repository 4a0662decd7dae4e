"""File mechanisms every package shares: the atomic replacement of a small
file and the full positional write.

This module imports nothing of Opie, so any package (nbd and raid5 included)
may use it.
"""
from __future__ import annotations

import os
import tempfile


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> None:
    """Replace `path` with `data`: durable on return, and a crash or a
    concurrent reader sees the old file or the new one, never a mix.

    A temporary file with a unique name in the same directory (created, then
    chmod `mode`), written and fsynced, renamed over `path`, then the directory
    fsynced so the rename itself survives a crash. The directory is created
    if missing. On any error the temporary file is removed and `path` is
    untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of `data` at `offset`, looping over short writes.

    Raises OSError (with the kernel's errno) on failure, and OSError(EIO) if
    the kernel makes no progress (a zero-length write). Not durable by itself:
    the caller fsyncs or fdatasyncs when its contract asks for it.
    """
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(5, f"pwrite made no progress at offset {offset + done}")
        done += n
