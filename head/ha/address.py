"""The service address: a /32 that moves with the active role (DESIGN.md,
"Two heads"; issue 10, takeover steps "add the service address" and
"gratuitous ARP").

Clients, the GUI and the CLI reach the cluster only at this address, so it
must be on exactly one head: the takeover calls `ServiceAddress.take` once
the shares are served, the demotion calls `ServiceAddress.release` first of
all (before the lease can expire). Both are idempotent, so a takeover or a
demotion that is run again after a crash does no harm.

The address is a /32: with the subnet's prefix it would become a
"secondary" of the interface's primary address and vanish with it. In the
loopback lab it is a 127.x address on `lo`, handled the same way (no ARP
there). Every call works in the caller's network namespace, through netlink
(pyroute2), and needs CAP_NET_ADMIN (CAP_NET_RAW for the ARP).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_LOOPBACK, IFF_NOARP

from opie.discovery.arp import gratuitous_arp
from opie.head.errors import ServiceAddressError

log = logging.getLogger(__name__)

PREFIXLEN = 32


@dataclass(frozen=True)
class ServiceAddress:
    """The service address `address`/32 on the interface `ifname`."""

    ifname: str
    address: ipaddress.IPv4Address

    @classmethod
    def parse(cls, ifname: str, address: str) -> ServiceAddress:
        """From admin text; ServiceAddressError unless `address` is one IPv4 address."""
        try:
            return cls(ifname, ipaddress.IPv4Address(address))
        except ValueError as exc:
            raise ServiceAddressError(f"service address: expected an IPv4 address, got {address!r}") from exc

    def _index(self, ipr: IPRoute) -> int:
        found = ipr.link_lookup(ifname=self.ifname)
        if not found:
            raise ServiceAddressError(f"{self.ifname}: no such interface for the service address {self.address}")
        return int(found[0])

    def present(self) -> bool:
        """True if `address`/32 is on `ifname` now."""
        with IPRoute() as ipr:
            index = self._index(ipr)
            return any(msg.get_attr("IFA_LOCAL") == str(self.address) and msg["prefixlen"] == PREFIXLEN
                       for msg in ipr.addr("dump", family=socket.AF_INET, index=index))

    def _change(self, command: str, unchanged: int, done: str) -> bool:
        """`ip addr COMMAND` of the /32; False if the kernel answers `unchanged` (nothing to do)."""
        with IPRoute() as ipr:
            index = self._index(ipr)
            try:
                ipr.addr(command, index=index, address=str(self.address), prefixlen=PREFIXLEN)
            except NetlinkError as exc:
                if exc.code == unchanged:
                    return False
                raise ServiceAddressError(f"{self.ifname}: {command} {self.address}/32: {exc}") from exc
        log.info("%s: service address %s/32 %s", self.ifname, self.address, done)
        return True

    def add(self) -> bool:
        """Put the address on the interface; True if this call added it, False if it was there.

        Once it returns the kernel answers ARP for the address and accepts
        connections to it; neighbours learn the new MAC only from `announce`.
        """
        return self._change("add", errno.EEXIST, "added")

    def remove(self) -> bool:
        """Take the address off the interface; True if this call removed it, False if it was not there.

        Connections already open to the address keep their sockets; the
        kernel no longer answers ARP for it nor accepts new connections.
        """
        return self._change("del", errno.EADDRNOTAVAIL, "removed")

    def does_arp(self) -> bool:
        """False for a loopback or NOARP interface, where announcing means nothing."""
        with IPRoute() as ipr:
            (link,) = ipr.link("get", index=self._index(ipr))
            return not link["flags"] & (IFF_LOOPBACK | IFF_NOARP)

    def announce(self, count: int = 1, interval: float = 1.0) -> bool:
        """Send gratuitous ARP for the address from this interface; False if it does no ARP.

        Neighbours that have an entry for the address (clients that talked to
        the old active) move it to this interface's MAC within milliseconds;
        without it they keep the old MAC for ~30 s. See
        `opie.discovery.arp.gratuitous_arp` for `count` and `interval`.
        """
        if not self.does_arp():
            return False
        try:
            gratuitous_arp(self.ifname, self.address, count, interval)
        except OSError as exc:
            raise ServiceAddressError(f"{self.ifname}: gratuitous ARP for {self.address}: {exc}") from exc
        return True

    def take(self) -> bool:
        """The takeover's step: add the address (if missing), then announce it (always).

        Returns whether this call added it. The announcement is sent even when
        the address was already there, since neighbours may still hold
        another head's MAC.
        """
        added = self.add()
        self.announce()
        return added

    def release(self) -> bool:
        """The demotion's step: remove the address if it is there; True if this call removed it."""
        return self.remove()
