"""ARP probe (RFC 5227 style): does any host on a link already use an address?

Used by the lease server before it offers an address for the first time, so
an address an admin configured by hand on some box is not handed out again.
Needs CAP_NET_RAW; runs in the caller's network namespace.
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


def probe_frame(src_mac: bytes, target: ipaddress.IPv4Address) -> bytes:
    """A broadcast ARP request for `target` with sender IP 0.0.0.0 (a probe)."""
    return (_ETH.pack(b"\xff" * 6, src_mac, ETH_P_ARP)
            + _ARP.pack(1, 0x0800, 6, 4, 1, src_mac, bytes(4), bytes(6), target.packed))


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
