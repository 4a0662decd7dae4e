"""Socket helpers shared by the lease server, the ISU lease client and the heartbeat."""
from __future__ import annotations

import socket


def broadcast_socket(ifname: str, port: int) -> socket.socket:
    """A UDP socket bound to 0.0.0.0:`port` on `ifname` only, allowed to broadcast.

    Works on an interface without an IPv4 address (the kernel sends from
    0.0.0.0 and delivers limited broadcasts), which is how a new ISU talks.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.bind(("0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


def interface_ipv4(ifname: str) -> str | None:
    """The first IPv4 address on `ifname` in this network namespace, or None."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            return None
        for msg in ipr.addr("dump", family=socket.AF_INET, index=links[0]):
            return str(msg.get_attr("IFA_ADDRESS"))
    return None
