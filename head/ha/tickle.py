"""The tickle ACK (CTDB's `ctdb_killtcp`): make a client reset a connection
whose server end is gone, so it reconnects now instead of after TCP timeouts.

The new active has no socket for a connection a client had with the old
active through the service address. It sends the client a bare ACK from the
service address with sequence and acknowledgement numbers 0, which are out of
the client's window; the client answers with an ACK that carries its real
numbers; that ACK reaches the new active (the service address is here now,
announced by gratuitous ARP), whose kernel finds no socket for it and
answers with a RST that the client accepts. So the address must be on this
host and announced before the tickle is sent.

`tickle_packet` is pure (IPv4 and TCP headers with their checksums, RFC 791,
RFC 793, RFC 1071); `send_tickles` writes them to a raw IP socket
(IP_HDRINCL, needs CAP_NET_RAW) in the caller's network namespace.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable

log = logging.getLogger(__name__)

# IPv4 header (RFC 791), 20 bytes, no options:
#   version<<4|ihl, tos, total length, id, flags<<13|fragment offset,
#   ttl, protocol, header checksum, source, destination
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
# TCP header (RFC 793), 20 bytes, no options:
#   source port, destination port, sequence, acknowledgement,
#   data offset<<12|flags, window, checksum, urgent pointer
_TCP = struct.Struct("!HHIIHHHH")
# Pseudo-header the TCP checksum covers: source, destination, zero, protocol, TCP length
_PSEUDO = struct.Struct("!4s4sBBH")

TCP_ACK = 0x10
TTL = 64
WINDOW = 1234   # what CTDB sends; any value works


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): the ones' complement of the ones'
    complement sum of the 16-bit big-endian words of `data` (padded with a zero byte)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(src: ipaddress.IPv4Address, sport: int, dst: ipaddress.IPv4Address, dport: int,
                seq: int, ack: int, flags: int = TCP_ACK, window: int = WINDOW) -> bytes:
    """A 20-byte TCP header with no payload, its checksum over the IPv4 pseudo-header filled in."""
    header = _TCP.pack(sport, dport, seq, ack, (5 << 12) | flags, window, 0, 0)
    pseudo = _PSEUDO.pack(src.packed, dst.packed, 0, socket.IPPROTO_TCP, len(header))
    return header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]


def ipv4_packet(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, payload: bytes,
                ident: int = 0, ttl: int = TTL) -> bytes:
    """An IPv4 header (don't-fragment, protocol TCP, checksum filled in) followed by `payload`."""
    header = _IPV4.pack(0x45, 0, _IPV4.size + len(payload), ident, 0x4000, ttl, socket.IPPROTO_TCP,
                        0, src.packed, dst.packed)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def tickle_packet(server: ipaddress.IPv4Address, server_port: int,
                  client: ipaddress.IPv4Address, client_port: int) -> bytes:
    """The tickle ACK for one connection: from the server end to the client, seq = ack = 0."""
    return ipv4_packet(server, client, tcp_segment(server, server_port, client, client_port, 0, 0))


def send_tickles(packets: Iterable[tuple[ipaddress.IPv4Address, bytes]]) -> int:
    """Send each (destination, IPv4 packet) on one raw socket; returns how many were sent.

    A packet the kernel refuses (no route, say) is logged and skipped, so
    one bad destination does not spare the other clients. Nothing waits for
    the clients' answers.
    """
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        for dst, packet in packets:
            try:
                sock.sendto(packet, (str(dst), 0))
            except OSError as exc:
                log.warning("tickle to %s not sent: %s", dst, exc)
                continue
            sent += 1
    return sent
