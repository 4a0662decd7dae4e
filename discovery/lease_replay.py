"""Refusing replayed lease messages: a window on the sender's clock and a seen-set.

A lease datagram is signed with the cluster token, but anyone on the segment
can capture one and send it again: an old REQUEST would take an address back
for an ISU that left. The signed part of every message carries the sender's
wall clock and a random nonce (`discovery.lease_proto`, version 2); a
receiver keeps a `ReplayGuard` and refuses a message stamped more than
`window` seconds away from its own clock, or whose nonce it has already
accepted within the window. Nonces are forgotten once they fall out of the
window, so the seen-set holds at most one window of traffic. Head and ISU
clocks must agree within the window (NTP, or the lab's shared clock).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from opie.discovery.lease_proto import LeaseMessage, ReplayedMessage

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 120.0  # seconds either side of the receiver's clock


class ReplayGuard:
    """Accept each signed message once, and only while it is fresh.

    Not thread-safe: one receiving thread calls `check`. `clock` is the wall
    clock in seconds (injectable for tests)."""

    def __init__(self, window: float = DEFAULT_WINDOW, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.clock = clock
        self._seen: dict[bytes, float] = {}  # nonce -> sent_at of messages accepted in the window

    def check(self, msg: LeaseMessage) -> None:
        """Record `msg` as seen, or raise ReplayedMessage (nothing recorded)."""
        now = self.clock()
        self._seen = {n: t for n, t in self._seen.items() if abs(now - t) <= self.window}
        if abs(now - msg.sent_at) > self.window:
            raise ReplayedMessage(f"replay or clock skew: stamped {msg.sent_at - now:+.0f} s from now, "
                                  f"outside the {self.window:.0f} s window")
        if msg.nonce in self._seen:
            raise ReplayedMessage("replay: this nonce was already accepted")
        self._seen[msg.nonce] = msg.sent_at
