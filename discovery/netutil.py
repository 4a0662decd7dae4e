"""Socket helpers shared by the lease server and the ISU lease client."""
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

