"""The head's address pool and its persisted leases (no sockets).

`LeasePool` decides offers and commits; refusals raise `LeaseRefused` with a
`NakReason` and change nothing, neither in memory nor on disk. A commit is
durable before it returns: the leases file is rewritten through a temporary
file, fsync and rename, so a crash leaves either the old or the new file.

Leases file (JSON)::

    {"magic": "opie-leases", "version": 1,
     "leases": [{"uuid": ..., "mac": ..., "address": ..., "expires": unix-seconds}, ...],
     "crc32": crc32 of the canonical JSON of "leases"}

Rules: one lease per UUID and per MAC, one UUID per address; a UUID keeps
its address across renewals and, while nobody else took it, after expiry.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from opie.fileio import atomic_write
from opie.discovery.lease_proto import NakReason

log = logging.getLogger(__name__)

FILE_MAGIC = "opie-leases"
FILE_VERSION = 1
OFFER_HOLD_SECS = 30.0
CONFLICT_HOLD_SECS = 300.0


class LeaseRefused(Exception):
    """A hello or request the pool will not satisfy; nothing was changed."""

    def __init__(self, reason: NakReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class IntegrityError(Exception):
    """The leases file is damaged: expected X, got Y."""


@dataclass(frozen=True)
class Lease:
    uuid: str
    mac: str
    address: str
    expires: float


def parse_pool(spec: str) -> list[ipaddress.IPv4Address]:
    """'10.0.0.100-10.0.0.120' or '10.0.0.100-120' or a CIDR -> addresses; raises ValueError."""
    if "-" in spec:
        first_s, last_s = spec.split("-", 1)
        first = ipaddress.IPv4Address(first_s.strip())
        last_s = last_s.strip()
        last = (ipaddress.IPv4Address(int(first) & ~0xFF | int(last_s)) if last_s.isdigit()
                else ipaddress.IPv4Address(last_s))
        if last < first:
            raise ValueError(f"pool {spec!r}: last address before the first")
        return [ipaddress.IPv4Address(a) for a in range(int(first), int(last) + 1)]
    return list(ipaddress.IPv4Network(spec, strict=True).hosts())


def _crc(leases: list[dict[str, object]]) -> int:
    return zlib.crc32(json.dumps(leases, sort_keys=True, separators=(",", ":")).encode())


def load_leases(path: str) -> list[Lease]:
    """Read a leases file; a missing file is an empty list. Raises IntegrityError."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: expected a JSON leases file, got {exc}") from None
    if not isinstance(doc, dict) or doc.get("magic") != FILE_MAGIC:
        raise IntegrityError(f"{path}: expected magic {FILE_MAGIC!r}")
    if doc.get("version") != FILE_VERSION:
        raise IntegrityError(f"{path}: expected version {FILE_VERSION}, got {doc.get('version')!r}")
    raw = doc.get("leases")
    if not isinstance(raw, list) or doc.get("crc32") != _crc(raw):
        raise IntegrityError(f"{path}: expected crc32 {doc.get('crc32')!r} to match the leases")
    try:
        return [Lease(str(r["uuid"]), str(r["mac"]), str(r["address"]), float(r["expires"]))
                for r in raw]
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{path}: bad lease record: {exc}") from None


def save_leases(path: str, leases: Iterable[Lease]) -> None:
    """Atomically replace the leases file; durable on return."""
    records = [asdict(lease) for lease in sorted(leases, key=lambda x: x.address)]
    doc = {"magic": FILE_MAGIC, "version": FILE_VERSION, "leases": records, "crc32": _crc(records)}
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True), mode=0o600)


class LeasePool:
    """Leases from an admin-given pool, persisted in `path`.

    Not thread-safe: one server thread owns it. `probe(address) -> bool`
    answers whether some host already uses an address (e.g. `arp_probe`);
    it is asked before an address is offered for the first time.
    """

    def __init__(self, path: str, pool: Iterable[ipaddress.IPv4Address], prefixlen: int,
                 lease_secs: int = 3600, clock: Callable[[], float] = time.time,
                 probe: Callable[[ipaddress.IPv4Address], bool] | None = None) -> None:
        self.path = path
        self.pool = list(pool)
        self._in_pool = set(self.pool)
        self.prefixlen = prefixlen
        self.lease_secs = lease_secs
        self.clock = clock
        self.probe = probe
        self._leases = {lease.uuid: lease for lease in load_leases(path)}
        self._offers: dict[str, tuple[ipaddress.IPv4Address, float]] = {}
        self._conflicts: dict[ipaddress.IPv4Address, float] = {}

    def leases(self) -> list[Lease]:
        return sorted(self._leases.values(), key=lambda x: x.address)

    def _holder(self, address: ipaddress.IPv4Address, now: float) -> str | None:
        """UUID holding `address` by an unexpired lease or a pending offer."""
        for lease in self._leases.values():
            if lease.address == str(address) and lease.expires > now:
                return lease.uuid
        for uuid, (offered, until) in self._offers.items():
            if offered == address and until > now:
                return uuid
        return None

    def _check_identity(self, uuid: str, mac: str, now: float) -> None:
        mine = self._leases.get(uuid)
        if mine is not None and mine.mac != mac and mine.expires > now:
            raise LeaseRefused(NakReason.DUPLICATE_UUID,
                               f"uuid {uuid} holds {mine.address} under mac {mine.mac}, "
                               f"claimed again by mac {mac}")
        for lease in self._leases.values():
            if lease.mac == mac and lease.uuid != uuid and lease.expires > now:
                raise LeaseRefused(NakReason.DUPLICATE_MAC,
                                   f"mac {mac} holds {lease.address} as uuid {lease.uuid}, "
                                   f"claimed again as uuid {uuid}")

    def _usable(self, address: ipaddress.IPv4Address, uuid: str, now: float) -> bool:
        holder = self._holder(address, now)
        if holder not in (None, uuid):
            return False
        return self._conflicts.get(address, 0.0) <= now

    def offer(self, uuid: str, mac: str) -> ipaddress.IPv4Address:
        """Pick an address for a hello and hold it for OFFER_HOLD_SECS; nothing is persisted."""
        now = self.clock()
        self._check_identity(uuid, mac, now)
        pending = self._offers.get(uuid)
        if pending is not None and pending[1] > now:  # a retransmitted hello
            return pending[0]
        mine = self._leases.get(uuid)
        candidates: list[ipaddress.IPv4Address] = []
        if mine is not None and ipaddress.IPv4Address(mine.address) in self._in_pool:
            candidates.append(ipaddress.IPv4Address(mine.address))
        used_before = {ipaddress.IPv4Address(x.address) for x in self._leases.values()}
        candidates += [a for a in self.pool if a not in used_before]
        candidates += [a for a in self.pool if a in used_before]
        for address in candidates:
            if not self._usable(address, uuid, now):
                continue
            is_own = mine is not None and mine.address == str(address)
            if not is_own and self.probe is not None and self.probe(address):
                self._conflicts[address] = now + CONFLICT_HOLD_SECS
                log.warning("address %s answers ARP but is not leased: skipped for %ds",
                            address, CONFLICT_HOLD_SECS)
                continue
            self._offers[uuid] = (address, now + OFFER_HOLD_SECS)
            return address
        raise LeaseRefused(NakReason.POOL_EXHAUSTED, f"no free address in the pool for uuid {uuid}")

    def commit(self, uuid: str, mac: str, address: ipaddress.IPv4Address) -> Lease:
        """Grant or renew `address` for `uuid`; durable on return. Raises LeaseRefused."""
        now = self.clock()
        if address not in self._in_pool:
            raise LeaseRefused(NakReason.OUT_OF_POOL, f"uuid {uuid} asked for {address}, outside the pool")
        self._check_identity(uuid, mac, now)
        holder = self._holder(address, now)
        if holder not in (None, uuid):
            raise LeaseRefused(NakReason.ADDRESS_TAKEN,
                               f"uuid {uuid} asked for {address}, held by uuid {holder}")
        if self._conflicts.get(address, 0.0) > now:
            raise LeaseRefused(NakReason.ADDRESS_CONFLICT,
                               f"uuid {uuid} asked for {address}, which another host answers ARP for")
        lease = Lease(uuid, mac, str(address), now + self.lease_secs)
        new = dict(self._leases)
        new[uuid] = lease
        save_leases(self.path, new.values())
        old = self._leases.get(uuid)
        self._leases = new
        self._offers.pop(uuid, None)
        if old is None or old.address != lease.address:
            log.info("leased %s to uuid %s (mac %s)", address, uuid, mac)
        return lease
