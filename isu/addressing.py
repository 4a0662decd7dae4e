"""The ISU's network settings: lease client, address application, persisted config.

Two paths end in the same place, the ISU config `isu.json` of `isu.identity`
(keys owned here; all other keys are kept as they are)::

    "name": "isu3", "address": "10.213.7.100/24", "head": "10.213.7.1:8080",
    "address_source": "lease" | "console", "lease_expires": 1790000000.0

`LeaseClient.acquire` takes an address from the head's lease server
(hello/offer/request/ack), applies it with pyroute2 and persists it; the
serial console (`isu.console`) persists what the admin typed through
`update_network`. Writes are atomic and durable on return (identity.update).
"""
from __future__ import annotations

import ipaddress
import logging
import secrets
import select
import socket
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any

from opie.discovery.lease_proto import (LEASE_CLIENT_PORT, LEASE_SERVER_PORT, Kind, LeaseMessage,
                                        LeaseProtocolError, NakReason, decode, encode)
from opie.discovery.lease_replay import ReplayGuard
from opie.discovery.netutil import broadcast_socket
from opie.isu import identity
from opie.netaddr import parse_host_port

log = logging.getLogger(__name__)

NAME_MAX = 63


class ConfigError(Exception):
    """The ISU config file or a value for it is not valid; nothing was written."""


class LeaseDenied(Exception):
    """The lease server answered NAK; `reason` says why. Nothing was applied."""

    def __init__(self, reason: NakReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LeaseTimeout(Exception):
    """No valid answer from a lease server in time. Nothing was applied."""


@dataclass(frozen=True)
class NetworkSettings:
    name: str | None = None
    address: str | None = None        # "A.B.C.D/P"
    head: str | None = None           # "A.B.C.D:PORT"
    source: str | None = None         # "lease" or "console"
    lease_expires: float | None = None


def parse_name(text: str) -> str:
    """A host-name-like ISU name (letters, digits, '-', '_', '.'; 1..63); raises ConfigError."""
    if not 1 <= len(text) <= NAME_MAX or not all(c.isascii() and (c.isalnum() or c in "-_.")
                                                 for c in text):
        raise ConfigError(f"expected a name of 1..{NAME_MAX} letters, digits, '-', '_' or '.', "
                          f"got {text!r}")
    return text


def parse_address(text: str) -> ipaddress.IPv4Interface:
    """'A.B.C.D/P' with a usable unicast host address; raises ConfigError."""
    if "/" not in text:
        raise ConfigError(f"expected an address like 10.0.0.5/24, got {text!r}")
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError as exc:
        raise ConfigError(f"expected an address like 10.0.0.5/24, got {text!r} ({exc})") from None
    ip, net = iface.ip, iface.network
    edge = net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address)
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_reserved or edge:
        raise ConfigError(f"expected a unicast host address, got {text!r}")
    return iface


def parse_head(text: str) -> tuple[str, int]:
    """'A.B.C.D:PORT' -> (address, port); raises ConfigError."""
    try:
        host, port = parse_host_port(text)
        address = ipaddress.IPv4Address(host)
    except ValueError as exc:
        raise ConfigError(f"expected a head like 10.0.0.1:8080, got {text!r} ({exc})") from None
    return str(address), port


def _validate(settings: NetworkSettings) -> None:
    if settings.name is not None:
        parse_name(settings.name)
    if settings.address is not None:
        parse_address(settings.address)
    if settings.head is not None:
        parse_head(settings.head)
    if settings.source not in (None, "lease", "console"):
        raise ConfigError(f"expected source lease or console, got {settings.source!r}")


_KEYS = {"name": "name", "address": "address", "head": "head", "source": "address_source",
         "lease_expires": "lease_expires"}


def read_network(state_dir: str) -> NetworkSettings:
    """The persisted network settings (None where unset); creates the identity on first use."""
    try:
        cfg = identity.load(state_dir)
    except identity.IdentityError as exc:
        raise ConfigError(str(exc)) from None
    settings = NetworkSettings(**{field: cfg.get(key) for field, key in _KEYS.items()})
    try:
        _validate(settings)
    except ConfigError as exc:
        raise ConfigError(f"{state_dir}: {exc}") from None
    return settings


def update_network(state_dir: str, **changes: Any) -> NetworkSettings:
    """Validate and persist `changes` (fields of NetworkSettings); atomic, durable on return.

    Raises ConfigError (config unchanged) for a bad value or a damaged config.
    """
    try:
        settings = replace(read_network(state_dir), **changes)
    except TypeError as exc:
        raise ConfigError(f"unknown network setting: {exc}") from None
    _validate(settings)
    identity.update(state_dir, **{_KEYS[field]: getattr(settings, field) for field in changes})
    return settings


def interface_mac(ifname: str) -> str:
    """The MAC of `ifname` in this network namespace (netlink, not /sys, which
    shows the namespace sysfs was mounted in)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            raise ConfigError(f"no interface {ifname!r} on this ISU")
        (link,) = ipr.link("get", index=links[0])
        return str(link.get_attr("IFLA_ADDRESS"))


def apply_address(ifname: str, address: ipaddress.IPv4Interface) -> None:
    """Make `address` the only IPv4 address of `ifname` (pyroute2), and bring it up."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            raise ConfigError(f"no interface {ifname!r} on this ISU")
        index = links[0]
        present = False
        for msg in ipr.addr("dump", family=socket.AF_INET, index=index):
            have = ipaddress.IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            if have == address:
                present = True
            else:
                ipr.addr("del", index=index, address=str(have.ip), prefixlen=have.network.prefixlen)
        if not present:
            ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
        ipr.link("set", index=index, state="up")
    log.info("%s: address %s applied", ifname, address)


@dataclass(frozen=True)
class AcquiredLease:
    address: ipaddress.IPv4Interface
    head: tuple[str, int] | None
    expires: float


class LeaseClient:
    """Take (and renew) an address from the head's lease server on `ifname`.

    The ISU's UUID comes from its identity in `state_dir` unless given.

    Blocking; one caller at a time. `acquire` and `renew` apply the address
    and persist it before returning; on NAK or timeout nothing is changed.
    """

    def __init__(self, ifname: str, token: bytes, state_dir: str, *, uuid: uuidlib.UUID | None = None,
                 mac: str | None = None, server_port: int = LEASE_SERVER_PORT,
                 client_port: int = LEASE_CLIENT_PORT, retry: float = 0.5) -> None:
        self.ifname = ifname
        self.uuid = uuid or uuidlib.UUID(identity.load(state_dir)["uuid"])
        self.token = token
        self.state_dir = state_dir
        self.mac = mac or interface_mac(ifname)
        self.server_port = server_port
        self.client_port = client_port
        self.retry = retry
        self.replay = ReplayGuard()

    def _exchange(self, sock: socket.socket, msg: LeaseMessage, want: Kind, deadline: float) -> LeaseMessage:
        """Broadcast `msg` every `retry` s until a valid `want` (or NAK) for it arrives.

        Every send is stamped and signed afresh (the server refuses a repeated nonce)."""
        while time.monotonic() < deadline:
            sock.sendto(encode(msg, self.token), ("255.255.255.255", self.server_port))
            resend = min(deadline, time.monotonic() + self.retry)
            while (left := resend - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    continue
                raw, sender = sock.recvfrom(2048)
                try:
                    answer = decode(raw, self.token)
                except LeaseProtocolError as exc:
                    log.warning("%s: ignored lease datagram from %s: %s", self.ifname, sender[0], exc)
                    continue
                if answer.xid != msg.xid or answer.uuid != self.uuid or answer.mac != self.mac:
                    continue  # another ISU's transaction
                try:
                    self.replay.check(answer)
                except LeaseProtocolError as exc:
                    log.warning("%s: ignored lease datagram from %s: %s", self.ifname, sender[0], exc)
                    continue
                if answer.kind is Kind.NAK:
                    raise LeaseDenied(answer.reason,
                                      f"lease server {sender[0]} refused: {answer.reason.name}")
                if answer.kind is want:
                    return answer
        raise LeaseTimeout(f"{self.ifname}: no {want.name} from a lease server")

    def _request(self, sock: socket.socket, xid: int, address: ipaddress.IPv4Interface,
                 deadline: float) -> AcquiredLease:
        request = LeaseMessage(Kind.REQUEST, xid, self.uuid, self.mac, address.ip, address.network.prefixlen)
        ack = self._exchange(sock, request, Kind.ACK, deadline)
        lease = AcquiredLease(ack.interface,
                              (str(ack.head_addr), ack.head_port) if ack.head_port else None,
                              time.time() + ack.lease_secs)
        apply_address(self.ifname, lease.address)
        update_network(self.state_dir, address=str(lease.address), source="lease",
                       lease_expires=lease.expires,
                       **({"head": f"{lease.head[0]}:{lease.head[1]}"} if lease.head else {}))
        return lease

    def acquire(self, timeout: float = 10.0) -> AcquiredLease:
        """Hello, offer, request, ack; then apply and persist. Raises LeaseDenied/LeaseTimeout."""
        deadline = time.monotonic() + timeout
        xid = secrets.randbits(32)
        with broadcast_socket(self.ifname, self.client_port) as sock:
            hello = LeaseMessage(Kind.HELLO, xid, self.uuid, self.mac)
            offer = self._exchange(sock, hello, Kind.OFFER, deadline)
            lease = self._request(sock, xid, offer.interface, deadline)
        log.info("%s: leased %s until %s", self.ifname, lease.address, time.ctime(lease.expires))
        return lease

    def renew(self, timeout: float = 5.0) -> AcquiredLease:
        """Ask again for the persisted leased address; extends the lease.

        LeaseDenied means the address is no longer ours (e.g. it expired and
        was leased to another ISU): call `acquire` for a new one.
        """
        current = read_network(self.state_dir)
        if current.address is None or current.source != "lease":
            raise ConfigError("no leased address to renew")
        deadline = time.monotonic() + timeout
        with broadcast_socket(self.ifname, self.client_port) as sock:
            return self._request(sock, secrets.randbits(32), parse_address(current.address), deadline)

    def keep(self, lease: AcquiredLease, stop: threading.Event,
             on_new_address: Callable[[AcquiredLease], None] | None = None) -> None:
        """Renew at half of each lease until `stop` is set; blocking, run it on its own thread.

        A refused renewal leads to a fresh `acquire`; a server that does not
        answer is retried until the lease has expired, then a fresh
        `acquire` is tried. When the address changes, `on_new_address` is
        called (the announcer and heartbeat must move). Returns when `stop`
        is set or when the admin set a static address on the console (the
        persisted source is no longer "lease"). Errors are logged, never raised.
        """
        while not stop.wait(max(0.5, (lease.expires - time.time()) / 2)):
            try:
                if read_network(self.state_dir).source != "lease":
                    log.info("%s: address set on the console; lease no longer kept", self.ifname)
                    return
            except ConfigError as exc:
                log.error("%s: cannot read the ISU config: %s", self.ifname, exc)
                continue
            before = lease.address
            try:
                try:
                    lease = self.renew()
                except LeaseDenied as exc:
                    log.error("%s: renewal of %s refused (%s); asking for a new address",
                              self.ifname, lease.address, exc.reason.name)
                    lease = self.acquire()
                except LeaseTimeout:
                    if time.time() < lease.expires:
                        log.warning("%s: no answer to the renewal of %s; will retry",
                                    self.ifname, lease.address)
                        continue
                    log.error("%s: lease of %s expired without renewal", self.ifname, lease.address)
                    lease = self.acquire()
            except (LeaseDenied, LeaseTimeout, ConfigError, OSError) as exc:
                log.error("%s: cannot keep an address: %s", self.ifname, exc)
            if lease.address != before and on_new_address is not None:
                on_new_address(lease)
