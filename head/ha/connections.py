"""Client TCP connections to the service address: listed by the active so it
can publish them, reset by the new active at takeover (issue 10, the last
takeover step; CTDB keeps the same list for its `ctdb_killtcp`).

The active lists the established connections whose local end is the service
address on a share port (smbd's 445 or the configured SMB port, the NFS
port) with `client_connections`, and publishes `encode(list)`; the lead puts
it in etcd. The new active reads it back with `decode` and calls
`reset_connections` after the service address is on it and announced: every
client then gets a RST (see opie.head.ha.tickle) and reconnects at once.

The list comes from /proc/net/tcp and /proc/net/tcp6 (IPv4-mapped
addresses only) of the caller's network namespace.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from opie.head.errors import ServiceAddressError
from opie.head.ha.tickle import send_tickles, tickle_packet
from opie.netaddr import parse_host_port

log = logging.getLogger(__name__)

PROC_NET = "/proc/net"
TCP_ESTABLISHED = 0x01
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


@dataclass(frozen=True, order=True)
class ClientConnection:
    """One TCP connection: the server end (the service address and a share port) and the client end."""

    server: ipaddress.IPv4Address
    server_port: int
    client: ipaddress.IPv4Address
    client_port: int

    def to_json(self) -> dict[str, str]:
        return {"server": f"{self.server}:{self.server_port}", "client": f"{self.client}:{self.client_port}"}

    @classmethod
    def from_json(cls, obj: object) -> ClientConnection:
        """From `to_json`'s dict; ServiceAddressError naming what is wrong."""
        if not isinstance(obj, dict) or set(obj) != {"server", "client"}:
            raise ServiceAddressError(f"connection: expected {{'server', 'client'}}, got {obj!r}")
        try:
            ends = [parse_host_port(obj[k]) for k in ("server", "client")]
            (server, sport), (client, cport) = [(ipaddress.IPv4Address(h), p) for h, p in ends]
        except ValueError as exc:
            raise ServiceAddressError(f"connection {obj!r}: {exc}") from exc
        return cls(server, sport, client, cport)


def _address(hex_text: str) -> ipaddress.IPv4Address | None:
    """A /proc/net/tcp{,6} address (32-bit words in the host's byte order) -> IPv4, or None for non-mapped IPv6."""
    raw = b"".join(struct.pack("=I", int(hex_text[i:i + 8], 16)) for i in range(0, len(hex_text), 8))
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    v6 = ipaddress.IPv6Address(raw)
    return v6.ipv4_mapped if v6 in _MAPPED else None


def parse_proc_net_tcp(text: str) -> Iterator[tuple[int, tuple[ipaddress.IPv4Address, int],
                                                     tuple[ipaddress.IPv4Address, int]]]:
    """(state, local end, remote end) for each IPv4 socket of a /proc/net/tcp or tcp6 text.

    The header line and IPv6 sockets that are not IPv4-mapped are skipped;
    a line that does not parse raises ValueError.
    """
    for line in text.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        ends = []
        for field in fields[1:3]:
            host, _, port = field.partition(":")
            ends.append((_address(host), int(port, 16)))
        (local, lport), (remote, rport) = ends
        if local is None or remote is None:
            continue
        yield int(fields[3], 16), (local, lport), (remote, rport)


def client_connections(address: ipaddress.IPv4Address, ports: Iterable[int],
                       proc_net: str = PROC_NET) -> list[ClientConnection]:
    """The established connections to `address` on one of `ports`, sorted, as the kernel has them now."""
    wanted = set(ports)
    found = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc_net}/{name}") as f:
                text = f.read()
        except FileNotFoundError:   # no IPv6 in this kernel
            continue
        for state, (local, lport), (remote, rport) in parse_proc_net_tcp(text):
            if state == TCP_ESTABLISHED and local == address and lport in wanted:
                found.add(ClientConnection(local, lport, remote, rport))
    return sorted(found)


def encode(connections: Iterable[ClientConnection]) -> str:
    """The list as JSON text, for the active to publish."""
    return json.dumps([c.to_json() for c in sorted(connections)])


def decode(text: str) -> list[ClientConnection]:
    """`encode`'s text back; ServiceAddressError if it is not such a list."""
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise ServiceAddressError(f"connection list: not JSON: {exc}") from exc
    if not isinstance(items, list):
        raise ServiceAddressError(f"connection list: expected a list, got {type(items).__name__}")
    return [ClientConnection.from_json(item) for item in items]


def reset_connections(connections: Iterable[ClientConnection], rounds: int = 1,
                      interval: float = 0.6) -> int:
    """Tickle every connection's client so it resets the connection; returns the packets sent.

    Called by the new active only, after `ServiceAddress.take` (the clients'
    answers must reach this host). Returns once the tickles are sent, not
    when the clients have reset. `rounds` > 1 sends them again every
    `interval` s (a client answers an out-of-window segment at most every
    0.5 s, Linux's tcp_invalid_ratelimit), for a tickle or answer lost.
    """
    conns = list(connections)
    packets = [(c.client, tickle_packet(c.server, c.server_port, c.client, c.client_port)) for c in conns]
    sent = 0
    for i in range(rounds):
        if i:
            time.sleep(interval)
        sent += send_tickles(packets)
    if conns:
        log.info("reset %d client connection(s) of the service address (%d tickles)", len(conns), sent)
    return sent
