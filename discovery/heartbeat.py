"""Heartbeat liveness: the head pings each ISU over UDP, the ISU answers.

zeroconf keeps a killed ISU listed ~19 minutes, so the head decides "dead"
from missed heartbeats: with the defaults (ping every 0.25 s, dead after
1.5 s without a pong) a killed ISU is declared dead 1.5-1.8 s after its
last answer. Datagram layout (big-endian)::

    0   4  magic    b"OPHB"
    4   1  version  1
    5   1  kind     1 ping (head -> ISU), 2 pong (ISU -> head)
    6   2  reserved 0
    8   4  seq      ping sequence number, echoed in the pong
    12  16 uuid     the ISU the ping is for / the ISU that answers
    28  4  crc32    of bytes 0..27
    32     total

An ISU answers only pings addressed to its own UUID, so an address taken
over by another ISU does not keep the old one "alive". `decode` fails only
with `BadHeartbeat`.
"""
from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from opie.discovery.lifecycle import Service

log = logging.getLogger(__name__)

MAGIC = b"OPHB"
VERSION = 1
PING, PONG = 1, 2
_BODY = struct.Struct("!4sBBHI16s")
_CRC = struct.Struct("!I")
SIZE = _BODY.size + _CRC.size


class BadHeartbeat(ValueError):
    """Not a heartbeat datagram of this version."""


@dataclass(frozen=True)
class Beat:
    kind: int
    seq: int
    uuid: uuidlib.UUID


def encode(beat: Beat) -> bytes:
    body = _BODY.pack(MAGIC, VERSION, beat.kind, 0, beat.seq, beat.uuid.bytes)
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes) -> Beat:
    if len(data) != SIZE:
        raise BadHeartbeat(f"expected {SIZE} bytes, got {len(data)}")
    magic, version, kind, reserved, seq, raw_uuid = _BODY.unpack_from(data)
    (crc,) = _CRC.unpack_from(data, _BODY.size)
    if magic != MAGIC or version != VERSION:
        raise BadHeartbeat(f"expected {MAGIC!r} v{VERSION}, got {magic!r} v{version}")
    if crc != zlib.crc32(data[:_BODY.size]):
        raise BadHeartbeat("expected matching crc32")
    if kind not in (PING, PONG) or reserved:
        raise BadHeartbeat(f"expected kind ping/pong, got {kind}")
    return Beat(kind, seq, uuidlib.UUID(bytes=raw_uuid))


class _Worker(Service):
    """One UDP socket served by one thread until `stop`."""

    def __init__(self, bind: tuple[str, int], name: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sock.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], self.wait_time())
            if ready:
                self._drain()
            self.tick()

    def _drain(self) -> None:
        """Handle every queued datagram (so a late tick judges on all answers received)."""
        while True:
            try:
                data, sender = self.sock.recvfrom(256, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. a queued ICMP error; the next datagram may be fine
                log.debug("heartbeat: receive: %s", exc)
                return
            try:
                beat = decode(data)
            except BadHeartbeat as exc:
                log.debug("heartbeat: ignored datagram from %s: %s", sender[0], exc)
            else:
                self.on_beat(beat, sender)

    def wait_time(self) -> float:
        return 0.2

    def on_beat(self, beat: Beat, sender: tuple[str, int]) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        pass


class HeartbeatResponder(_Worker):
    """ISU side: answer pings for `uuid` on `address`:`port` (0 = any free port)."""

    def __init__(self, uuid: uuidlib.UUID, address: str, port: int = 0) -> None:
        super().__init__((address, port), "heartbeat-responder")
        self.uuid = uuid

    def on_beat(self, beat: Beat, sender: tuple[str, int]) -> None:
        if beat.kind == PING and beat.uuid == self.uuid:
            try:
                self.sock.sendto(encode(Beat(PONG, beat.seq, self.uuid)), sender)
            except OSError as exc:
                log.debug("heartbeat: pong to %s: %s", sender[0], exc)


@dataclass
class _Peer:
    address: tuple[str, int]
    last_seen: float
    alive: bool = True


class LivenessMonitor(_Worker):
    """Head side: ping watched ISUs every `interval` s; dead after `timeout` s of silence.

    `on_dead(uuid, silent_for)` and `on_alive(uuid)` run on the monitor's
    thread, once per transition. A newly watched ISU counts as alive from
    the moment it is watched. `clock` is injectable (monotonic seconds).
    """

    def __init__(self, on_dead: Callable[[str, float], None], on_alive: Callable[[str], None],
                 bind_address: str = "0.0.0.0", interval: float = 0.25, timeout: float = 1.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__((bind_address, 0), "liveness-monitor")
        self.on_dead = on_dead
        self.on_alive = on_alive
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._seq = 0
        self._next_ping = 0.0
        self._last_tick = 0.0

    def watch(self, uuid: str, address: tuple[str, int]) -> None:
        """Start (or re-target) heartbeats to the ISU `uuid` at `address`."""
        with self._lock:
            peer = self._peers.get(uuid)
            if peer is None:
                self._peers[uuid] = _Peer(address, self.clock())
            else:
                peer.address = address

    def forget(self, uuid: str) -> None:
        with self._lock:
            self._peers.pop(uuid, None)

    def is_alive(self, uuid: str) -> bool:
        with self._lock:
            peer = self._peers.get(uuid)
            return peer is not None and peer.alive

    def wait_time(self) -> float:
        return max(0.0, min(self.interval, self._next_ping - self.clock()))

    def on_beat(self, beat: Beat, sender: tuple[str, int]) -> None:
        if beat.kind != PONG:
            return
        uuid = str(beat.uuid)
        with self._lock:
            peer = self._peers.get(uuid)
            if peer is None:
                return
            peer.last_seen = self.clock()
            revived = not peer.alive
            peer.alive = True
        if revived:
            log.warning("isu %s: heartbeat back", uuid)
            self.on_alive(uuid)

    def tick(self) -> None:
        now = self.clock()
        # If this thread itself was starved, the silence is ours, not the ISUs':
        # ping again and judge on the next tick.
        gap = now - self._last_tick
        stalled = bool(self._last_tick) and gap > max(2 * self.interval, 0.5)
        self._last_tick = now
        if stalled:
            log.warning("heartbeat: monitor thread stalled %.2f s; not judging this round", gap)
            self._next_ping = now
        died: list[tuple[str, float]] = []
        with self._lock:
            for uuid, peer in self._peers.items():
                if not stalled and peer.alive and now - peer.last_seen > self.timeout:
                    peer.alive = False
                    died.append((uuid, now - peer.last_seen))
            targets = [(uuid, peer.address) for uuid, peer in self._peers.items()]
        for uuid, silent in died:
            log.warning("isu %s: no heartbeat for %.2f s: dead", uuid, silent)
            self.on_dead(uuid, silent)
        if now >= self._next_ping:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            for uuid, address in targets:
                try:
                    self.sock.sendto(encode(Beat(PING, self._seq, uuidlib.UUID(uuid))), address)
                except OSError as exc:  # unreachable right now; silence will tell
                    log.debug("heartbeat to %s: %s", address, exc)
            self._next_ping = now + self.interval
