"""ARP on a link: the probe (RFC 5227 style) and the gratuitous announcement.

The probe asks whether any host on a link already uses an address; the lease
server runs it before it offers an address for the first time, so an address
an admin configured by hand on some box is not handed out again. The
announcement (what `arping -U` sends) tells the link's neighbours that an
address now lives at this interface's MAC; the head that takes the service
address sends it. Both need CAP_NET_RAW and run in the caller's network
namespace.
"""
from __future__ import annotations

import ipaddress
import logging
import select
import socket
import struct
import time

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
_ETH = struct.Struct("!6s6sH")
# htype, ptype, hlen, plen, op, sender mac, sender ip, target mac, target ip
_ARP = struct.Struct("!HHBBH6s4s6s4s")


def _request_frame(src_mac: bytes, sender_ip: bytes, target_ip: bytes) -> bytes:
    """A broadcast ARP request (op 1) from `src_mac` with the given sender and target IPs."""
    return (_ETH.pack(b"\xff" * 6, src_mac, ETH_P_ARP)
            + _ARP.pack(1, 0x0800, 6, 4, 1, src_mac, sender_ip, bytes(6), target_ip))


def probe_frame(src_mac: bytes, target: ipaddress.IPv4Address) -> bytes:
    """A broadcast ARP request for `target` with sender IP 0.0.0.0 (a probe)."""
    return _request_frame(src_mac, bytes(4), target.packed)


def announce_frame(src_mac: bytes, address: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP: a broadcast request whose sender and target IP are both `address`.

    A neighbour that has an entry for `address` replaces its MAC with
    `src_mac` (a request, not a reply, as `arping -U` sends it); nobody answers.
    """
    return _request_frame(src_mac, address.packed, address.packed)


def claims(frame: bytes, target: ipaddress.IPv4Address, own_mac: bytes) -> bool:
    """True if `frame` is an ARP packet from another host whose sender IP is `target`."""
    if len(frame) < _ETH.size + _ARP.size:
        return False
    _, _, ethertype = _ETH.unpack_from(frame)
    if ethertype != ETH_P_ARP:
        return False
    _, ptype, _, _, _, sender_mac, sender_ip, _, _ = _ARP.unpack_from(frame, _ETH.size)
    return ptype == 0x0800 and sender_ip == target.packed and sender_mac != own_mac


def arp_probe(ifname: str, target: ipaddress.IPv4Address, timeout: float = 0.2, tries: int = 2) -> bool:
    """True if some host on `ifname` answers ARP for `target` within `timeout` per try."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((ifname, ETH_P_ARP))
        own_mac = sock.getsockname()[4]
        for _ in range(tries):
            sock.send(probe_frame(own_mac, target))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if ready and claims(sock.recv(2048), target, own_mac):
                    log.info("%s: %s is in use (ARP answer)", ifname, target)
                    return True
    return False


def gratuitous_arp(ifname: str, address: ipaddress.IPv4Address, count: int = 1,
                   interval: float = 1.0) -> None:
    """Send `count` gratuitous ARPs for `address` from `ifname`'s MAC, `interval` s apart.

    Returns once they are handed to the link (blocks (count-1)*interval s);
    nothing confirms that a neighbour took them. Linux neighbours ignore a
    second update within their locktime (1 s by default), so a repeat is only
    worth sending at `interval` >= 1 s, for a neighbour that looked the
    address up just before the first. OSError if the interface is missing or down.
    """
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((ifname, ETH_P_ARP))
        frame = announce_frame(sock.getsockname()[4], address)
        for i in range(count):
            if i:
                time.sleep(interval)
            sock.send(frame)
    log.debug("%s: gratuitous ARP for %s sent (%d)", ifname, address, count)
