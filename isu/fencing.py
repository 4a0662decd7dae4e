"""The ISU's epoch gate: which head's connections may use its disks (issue 10).

Every NBD connection of a head is bound to the epoch the head declared
(nbd.server, OPT_OPIE_EPOCH). This gate keeps the highest epoch the ISU
accepted, durable in its state dir, and decides admission:

- a declared epoch equal to the accepted one: served read-write;
- a lower one: refused ("stale epoch": a newer head fenced this one);
- a higher one: refused until a head fences the ISU at it ("fence first"),
  so a new head cannot share the ISU with the old one before the old one is
  shut out; the new active fences, then connects;
- no epoch declared (admins' nbdinfo/nbdcopy, epoch 0): read-write while the
  ISU was never fenced (a single head without HA, as before), read-only
  afterwards: an admin may still inspect a disk, but nothing writes to it
  without an epoch, and a fence also closes these connections.

`fence(E, server)` (the control channel's `fence` op; only a head may ask,
isu.control) does, in this order: refuse epochs below E from now on (no new
connection of them is admitted); end the sessions bound below E (their
requests refused from then on, the running ones finished or aborted, the
splice path included: `NBDServer.fence`); write E durably (atomic_write,
fsync); only then return, and the control channel acknowledges. A fence
below the accepted epoch raises StaleEpoch and changes nothing; one at the
accepted epoch is a harmless repeat (a head retrying after a lost reply).

The record is loaded when the gate is built, before the agent serves
anything; a torn or corrupt record raises EpochRecordError (never read as 0).

Who calls what: `admit` is the NBD server's hook (any of its threads, under
its lock; never blocks). `fence` runs on the agent's loop, one at a time.
"""
from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opie.fileio import atomic_write
from opie.isu.errors import EpochRecordError, FencingError, StaleEpoch
from opie.nbd.constants import MAX_EPOCH
from opie.nbd.server import Admission, NBDServer

log = logging.getLogger(__name__)

FILENAME = "epoch"
MAGIC = b"OPIEEPOC"
VERSION = 1
DRAIN_SECS = 3.0   # a fenced session's running requests get this long to finish

EpochVerifier = Callable[[int], Awaitable[bool]]

# The epoch record, the file `epoch` in the ISU state dir, 24 bytes, big-endian:
#   0  8s   magic b"OPIEEPOC"
#   8  u16  version (1)
#  10  u16  reserved, 0
#  12  u64  epoch: the highest this ISU accepted (1..MAX_EPOCH)
#  20  u32  crc32 of bytes 0..19
# No file: never fenced (epoch 0).
_RECORD = struct.Struct(">8sHHQ")
_CRC = struct.Struct(">I")
RECORD_SIZE = _RECORD.size + _CRC.size


@dataclass(frozen=True)
class EpochRecord:
    epoch: int

    def to_bytes(self) -> bytes:
        if not 1 <= self.epoch <= MAX_EPOCH:
            raise ValueError(f"epoch must be 1..{MAX_EPOCH}, got {self.epoch}")
        body = _RECORD.pack(MAGIC, VERSION, 0, self.epoch)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "epoch record") -> "EpochRecord":
        """EpochRecordError("where: expected X, got Y") for anything but a whole, valid record."""
        def bad(what: str, want: Any, got: Any) -> EpochRecordError:
            return EpochRecordError(f"{where}: expected {what} {want}, got {got}; "
                                    "refusing to serve rather than forget the fencing epoch")
        if len(data) != RECORD_SIZE:
            raise bad("a record of", f"{RECORD_SIZE} bytes", f"{len(data)} (torn?)")
        magic, version, reserved, epoch = _RECORD.unpack_from(data)
        if magic != MAGIC:
            raise bad("magic", MAGIC, magic)
        (crc,) = _CRC.unpack_from(data, _RECORD.size)
        if crc != zlib.crc32(data[:_RECORD.size]):
            raise bad("crc32", f"{zlib.crc32(data[:_RECORD.size]):#010x}", f"{crc:#010x}")
        if version != VERSION:
            raise bad("version", VERSION, version)
        if reserved != 0 or not 1 <= epoch <= MAX_EPOCH:
            raise bad("an epoch in", f"1..{MAX_EPOCH} (reserved 0)", f"{epoch} (reserved {reserved})")
        return cls(epoch)


def record_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / FILENAME


def load(state_dir: str | os.PathLike) -> int:
    """The accepted epoch recorded in `state_dir` (0: never fenced)."""
    path = record_path(state_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise EpochRecordError(f"{path}: cannot read the epoch record: {exc}") from None
    return EpochRecord.from_bytes(data, str(path)).epoch


def save(state_dir: str | os.PathLike, epoch: int) -> None:
    """Durable on return (atomic_write: temp file, fsync, rename, fsync of the dir)."""
    atomic_write(record_path(state_dir), EpochRecord(epoch).to_bytes(), mode=0o600)


class EpochGate:
    """The highest accepted epoch of one ISU, and admission by it (module docstring).

    `verifier` (optional, async, `verifier(E) -> bool`): asked by the control
    channel's fence op before fencing at E; False or an error refuses the fence
    and changes nothing. The coordinator's check goes there (is E the current
    leader's epoch in etcd?); None accepts any epoch a head's certificate asks for."""

    def __init__(self, state_dir: str | os.PathLike, verifier: EpochVerifier | None = None) -> None:
        self.state_dir = state_dir
        self.accepted = load(state_dir)   # durable; writers are admitted at this epoch only
        self._floor = self.accepted       # epochs below are refused; raised first by a fence
        self.verifier = verifier
        self._fencing = asyncio.Lock()
        if self.accepted:
            log.info("epoch gate: accepted epoch %d (from %s)", self.accepted, record_path(state_dir))

    def admit(self, epoch: int) -> Admission:
        """The NBD server's hook (nbd.server.EpochGate)."""
        floor, accepted = self._floor, self.accepted
        if epoch == 0:
            return Admission(read_only=accepted > 0 or floor > 0)
        if epoch < floor:
            return Admission(refused=f"stale epoch {epoch}: this ISU accepted epoch {floor} (a newer head fenced it)")
        if epoch != accepted:
            return Admission(refused=f"epoch {epoch} is not fenced on this ISU yet (it accepted {accepted}): "
                                     "fence first")
        return Admission()

    async def fence(self, epoch: int, server: NBDServer, drain: float = DRAIN_SECS) -> int:
        """Fence every epoch below `epoch` on `server`, in the order of the
        module docstring; durable when it returns the number of sessions it
        ended. StaleEpoch (nothing changed) below the accepted epoch;
        FencingError when it could not finish (not to be acknowledged: the
        epoch may not be durable, though older epochs stay refused until
        the ISU restarts)."""
        if not 1 <= epoch <= MAX_EPOCH:
            raise ValueError(f"epoch must be 1..{MAX_EPOCH}, got {epoch}")
        async with self._fencing:
            if epoch < self._floor:
                raise StaleEpoch(f"stale head: epoch {epoch} is below the accepted epoch {self._floor}")
            self._floor = epoch
            try:
                ended = await server.fence(epoch, drain)
            except TimeoutError as exc:
                raise FencingError(f"fence at epoch {epoch}: {exc}") from None
            if epoch != self.accepted:
                try:
                    await asyncio.get_running_loop().run_in_executor(None, save, self.state_dir, epoch)
                except OSError as exc:
                    raise FencingError(f"fence at epoch {epoch}: cannot record it: {exc}") from None
                self.accepted = epoch
            log.warning("fenced at epoch %d: older epochs refused, %d session(s) closed", epoch, ended)
            return ended


async def answer_fence(gate: EpochGate, server: NBDServer, request: dict[str, Any]) -> dict[str, Any]:
    """The control channel's `fence` op (isu.control; the head role was checked
    there): `{"op": "fence", "epoch": E}` -> `{"ok": true, "epoch": E, "closed": N}`
    once E is durable, or `{"ok": false, "error": ...}` with nothing changed
    (a bad or stale epoch, the verifier's refusal) or not acknowledged (FencingError)."""
    epoch = request.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= MAX_EPOCH:
        return {"ok": False, "error": f"epoch: expected an integer 1..{MAX_EPOCH}, got {epoch!r:.40}"}
    if epoch < gate.accepted:   # answered before asking the coordinator: stale is stale
        return {"ok": False, "error": f"stale head: epoch {epoch} is below the accepted epoch {gate.accepted}"}
    if gate.verifier is not None:
        try:
            confirmed = await gate.verifier(epoch)
        except Exception as exc:  # the coordinator unreachable: refuse, never fence blind
            log.error("fence at epoch %d: the epoch verifier failed: %s", epoch, exc)
            return {"ok": False, "error": f"epoch {epoch} could not be verified: {exc}"}
        if not confirmed:
            return {"ok": False, "error": f"epoch {epoch} is not the current head's epoch"}
    try:
        closed = await gate.fence(epoch, server)
    except FencingError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "epoch": epoch, "closed": closed}
