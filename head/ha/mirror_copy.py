"""The passive head's on-disk copy of the pool's metadata (the mapping table
and the catalog), kept in its state directory.

Two files of mirror frames (`mirror_frames`: magic, version, crc32 each):

    mirror.base   one FULL frame: every page as of transaction `seq`;
                  replaced with opie.fileio.atomic_write
    mirror.log    RECORD frames appended after it, each fsynced before
                  `apply` returns; each must continue the one before it

Loading takes the base and replays the log up to the first record that is
torn, damaged, or does not continue the copy (a record a crash cut short was
never acknowledged); the log is cut there. When the log outgrows the base it
is folded into a new base. A `replace` writes the new base before it empties
the log: a crash in between leaves log records older than the base, which do
not continue it and are cut on load (a pool's transaction numbers only grow).

Not thread-safe: one caller at a time (the receiver holds its lock; its
calls run in a worker thread, since they fsync).
"""
from __future__ import annotations

import logging
import os
import uuid as uuidlib
from pathlib import Path

from opie.fileio import atomic_write, pwrite_all
from opie.head.ha import mirror_frames as mf
from opie.head.ha.errors import FrameError, MirrorError

log = logging.getLogger(__name__)

BASE, LOG = "mirror.base", "mirror.log"


class MirrorCopy:
    """The copy in `directory`, loaded (and its log's torn tail cut) on construction."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pool_uuid: uuidlib.UUID | None = None
        self.seq = 0
        self.pages: dict[int, bytes] = {}
        self._base_size = 0
        self._log_size = 0
        self._load()

    # -- loading ---------------------------------------------------------
    def _load(self) -> None:
        try:
            kind, payload = mf.unframe((self.dir / BASE).read_bytes())
            if kind != mf.FULL:
                raise FrameError(f"base kind: expected {mf.FULL}, got {kind}")
            base = mf.Pages.from_bytes(kind, payload)
        except FileNotFoundError:
            self._cut_log(0)
            return
        except FrameError as exc:
            log.warning("mirror copy in %s is damaged (%s); it holds nothing", self.dir, exc)
            self._cut_log(0)
            return
        self.pool_uuid, self.seq, self.pages = base.pool_uuid, base.seq, dict(base.pages)
        self._base_size = (self.dir / BASE).stat().st_size
        data = (self.dir / LOG).read_bytes() if (self.dir / LOG).exists() else b""
        at = 0
        while at < len(data):
            try:
                end = at + mf.frame_length(data[at:at + mf.HEADER_SIZE])
                kind, payload = mf.unframe(data[at:end])
                record = mf.Pages.from_bytes(kind, payload)
                if kind != mf.RECORD:
                    raise FrameError(f"log kind: expected {mf.RECORD}, got {kind}")
                self._check_follows(record)
            except MirrorError as exc:
                log.warning("mirror log in %s: record at byte %d ignored and cut (%s)",
                            self.dir, at, exc)
                break
            self.pages.update(record.pages)
            self.seq = record.seq
            at = end
        self._cut_log(at)
        log.info("mirror copy of pool %s at transaction %d loaded", self.pool_uuid, self.seq)

    def _cut_log(self, size: int) -> None:
        """Make the log `size` bytes long, durably."""
        fd = os.open(self.dir / LOG, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
                os.fsync(fd)
        finally:
            os.close(fd)
        self._log_size = size

    # -- changes ---------------------------------------------------------
    def _check_follows(self, record: mf.Pages) -> None:
        if (record.pool_uuid, record.base) != (self.pool_uuid, self.seq):
            raise MirrorError(f"record base: expected pool {self.pool_uuid} at {self.seq}, "
                              f"got pool {record.pool_uuid} at {record.base}")
        if any(n >= len(self.pages) for n in record.pages):
            raise MirrorError(f"record pages: expected < {len(self.pages)}, got {max(record.pages)}")

    def replace(self, full: mf.Pages) -> None:
        """Make `full` (every page) the copy; durable on return."""
        data = full.frame(mf.FULL)
        atomic_write(self.dir / BASE, data, 0o600)
        self._cut_log(0)
        self.pool_uuid, self.seq, self.pages = full.pool_uuid, full.seq, dict(full.pages)
        self._base_size = len(data)
        log.info("mirror copy replaced: pool %s at transaction %d, %d pages", full.pool_uuid,
                 full.seq, len(full.pages))

    def apply(self, record: mf.Pages) -> None:
        """Apply a RECORD that continues the copy; durable on return.
        MirrorError, with nothing changed, if it does not continue it."""
        self._check_follows(record)
        data = record.frame(mf.RECORD)
        fd = os.open(self.dir / LOG, os.O_WRONLY)
        try:
            pwrite_all(fd, data, self._log_size)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self._log_size += len(data)
        self.pages.update(record.pages)
        self.seq = record.seq
        if self._log_size > self._base_size:
            self.replace(self.full())

    # -- reading ---------------------------------------------------------
    def full(self) -> mf.Pages:
        return mf.Pages(self.pool_uuid or mf.NO_POOL, 0, self.seq, dict(self.pages))

    def table(self) -> list[bytes]:
        """Every page, in page order (the serialized metadata)."""
        return [self.pages[n] for n in range(len(self.pages))]
