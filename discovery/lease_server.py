"""The head's lease server: a thin UDP shell around `LeasePool` and the codec.

One thread owns the socket and the pool. Every refusal is logged once as a
warning with the sender and the reason; a datagram that fails to decode
(malformed, or signed without the cluster token) or that is a replay (seen
before, or stamped outside the window: `discovery.lease_replay`) gets no
answer at all, a refused hello or request gets a NAK. Neither changes a lease.
"""
from __future__ import annotations

import ipaddress
import logging
import select
import socket
import threading

from opie.discovery.lease_pool import LeasePool, LeaseRefused
from opie.discovery.lease_proto import (ANY, LEASE_CLIENT_PORT, LEASE_SERVER_PORT, Kind,
                                        LeaseMessage, LeaseProtocolError, decode, encode)
from opie.discovery.lease_replay import ReplayGuard
from opie.discovery.lifecycle import Service
from opie.discovery.netutil import broadcast_socket

log = logging.getLogger(__name__)


class LeaseServer(Service):
    """Serve `pool` on `ifname`; use as a context manager or start()/close().

    `head` is the (address, port) handed to ISUs in offers and acks so they
    know where the head's API is. Replies are broadcast to LEASE_CLIENT_PORT,
    stamped with the pool's clock, which also judges the freshness of requests.
    """

    def __init__(self, pool: LeasePool, token: bytes, ifname: str,
                 head: tuple[str, int] | None = None, port: int = LEASE_SERVER_PORT,
                 client_port: int = LEASE_CLIENT_PORT) -> None:
        self.pool = pool
        self.replay = ReplayGuard(clock=pool.clock)
        self.token = token
        self.ifname = ifname
        self.head_addr = ipaddress.IPv4Address(head[0]) if head else ANY
        self.head_port = head[1] if head else 0
        self.port = port
        self.client_port = client_port
        self.refusals = 0
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._sock = broadcast_socket(self.ifname, self.port)
        self._thread = threading.Thread(target=self._run, name="lease-server", daemon=True)
        self._thread.start()
        log.info("lease server on %s:%d, pool %s..%s", self.ifname, self.port,
                 self.pool.pool[0], self.pool.pool[-1])

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.2)
            if not ready:
                continue
            data, sender = self._sock.recvfrom(2048)
            reply = self.handle(data, sender)
            if reply is not None:
                self._sock.sendto(encode(reply, self.token, self.pool.clock()),
                                  ("255.255.255.255", self.client_port))

    def _refuse(self, sender: tuple[str, int], what: str) -> None:
        self.refusals += 1
        log.warning("lease: refused %s from %s:%d", what, sender[0], sender[1])

    def handle(self, data: bytes, sender: tuple[str, int]) -> LeaseMessage | None:
        """Decide the answer to one datagram; None means stay silent."""
        try:
            msg = decode(data, self.token)
            self.replay.check(msg)
        except LeaseProtocolError as exc:
            self._refuse(sender, f"datagram ({exc})")
            return None
        uuid = str(msg.uuid)
        try:
            if msg.kind is Kind.HELLO:
                address = self.pool.offer(uuid, msg.mac)
                return msg.reply(Kind.OFFER, address=address, prefixlen=self.pool.prefixlen,
                                 lease_secs=self.pool.lease_secs,
                                 head_addr=self.head_addr, head_port=self.head_port)
            if msg.kind is Kind.REQUEST:
                lease = self.pool.commit(uuid, msg.mac, msg.address)
                return msg.reply(Kind.ACK, address=ipaddress.IPv4Address(lease.address),
                                 prefixlen=self.pool.prefixlen, lease_secs=self.pool.lease_secs,
                                 head_addr=self.head_addr, head_port=self.head_port)
        except LeaseRefused as exc:
            self._refuse(sender, f"{msg.kind.name.lower()} of uuid {uuid}: {exc.reason.name}: {exc}")
            return msg.reply(Kind.NAK, reason=exc.reason)
        except OSError as exc:  # the leases file could not be written: grant nothing
            log.error("lease: %s: cannot persist lease for uuid %s: %s", self.pool.path, uuid, exc)
            return None
        self._refuse(sender, f"{msg.kind.name} (only HELLO and REQUEST go to the server)")
        return None
