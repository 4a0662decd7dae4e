"""Wire format of the address-lease protocol (the seed's "simplified DHCP").

Pure codec: bytes in, `LeaseMessage` out and back; no sockets. `decode`
fails only with `LeaseProtocolError` (its subclasses `MalformedMessage`,
`BadSignature`; `ReplayedMessage` is raised by `discovery.lease_replay`).

Exchange, all datagrams broadcast on the lab segment (an ISU without an
address can neither send unicast nor be reached by it)::

    ISU  --HELLO(xid, uuid, mac)-->                 255.255.255.255:LEASE_SERVER_PORT
    head --OFFER(xid, address/prefix, secs, head)-> 255.255.255.255:LEASE_CLIENT_PORT
    ISU  --REQUEST(xid, address/prefix)-->          (also used later to renew)
    head --ACK(...) or NAK(reason)-->

Every message is signed with HMAC-SHA256 keyed by the cluster token, so a
hello from a host that does not know the token is refused. The signed part
carries the sender's clock and a random nonce, so a receiver refuses a
correctly signed message it has seen before or that is older than its window
(`discovery.lease_replay`); the xid alone, chosen by the sender, could not.
Version 1 (68 bytes, no stamp) is refused. Offsets in bytes, integers
big-endian::

    0   4  magic        b"OPLS"
    4   1  version      2
    5   1  kind         Kind (1 hello, 2 offer, 3 request, 4 ack, 5 nak)
    6   2  reason       NakReason, 0 unless kind is NAK
    8   4  xid          transaction id chosen by the ISU
    12  16 uuid         ISU UUID (raw bytes)
    28  6  mac          the ISU's MAC
    34  4  address      leased IPv4 address, 0.0.0.0 in HELLO
    38  1  prefixlen    0..32
    39  1  reserved     0
    40  4  lease_secs   lease length in seconds
    44  4  head_addr    where the head's API lives (0.0.0.0 if unknown)
    48  2  head_port
    50  2  reserved     0
    52  8  sent_at_ms   sender's wall clock, milliseconds since the Unix epoch
    60  8  nonce        random, fresh for every datagram sent (resends too)
    68  16 mac_tag      HMAC-SHA256(token, bytes 0..67), first 16 bytes
    84     total
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field

MAGIC = b"OPLS"
VERSION = 2
LEASE_SERVER_PORT = 7867
LEASE_CLIENT_PORT = 7868

_BODY = struct.Struct("!4sBBHI16s6s4sBBI4sHHQ8s")
NONCE_LEN = 8
TAG_LEN = 16
MESSAGE_LEN = _BODY.size + TAG_LEN
ANY = ipaddress.IPv4Address(0)


class Kind(enum.IntEnum):
    HELLO = 1
    OFFER = 2
    REQUEST = 3
    ACK = 4
    NAK = 5


class NakReason(enum.IntEnum):
    NONE = 0
    OUT_OF_POOL = 1        # the requested address is not in the admin's pool
    ADDRESS_TAKEN = 2      # leased or offered to another ISU
    DUPLICATE_UUID = 3     # this UUID already holds a lease under another MAC
    DUPLICATE_MAC = 4      # this MAC already holds a lease under another UUID
    POOL_EXHAUSTED = 5     # no free address left
    ADDRESS_CONFLICT = 6   # another host answered ARP for the address


class LeaseProtocolError(ValueError):
    """A datagram that is not a valid lease message; nothing may act on it."""


class MalformedMessage(LeaseProtocolError):
    """Wrong length, magic, version, kind or field values."""


class BadSignature(LeaseProtocolError):
    """The HMAC does not match: forged, or signed with another cluster's token."""


class ReplayedMessage(LeaseProtocolError):
    """Correctly signed, but seen before or stamped outside the receiver's window."""


@dataclass(frozen=True)
class LeaseMessage:
    kind: Kind
    xid: int
    uuid: uuidlib.UUID
    mac: str
    address: ipaddress.IPv4Address = ANY
    prefixlen: int = 0
    lease_secs: int = 0
    head_addr: ipaddress.IPv4Address = ANY
    head_port: int = 0
    reason: NakReason = NakReason.NONE
    # Set by decode() from the datagram; encode() stamps its own. Not part of equality.
    sent_at: float = field(default=0.0, compare=False)
    nonce: bytes = field(default=bytes(NONCE_LEN), compare=False)

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        """The leased address with its prefix, e.g. 10.213.7.100/24."""
        return ipaddress.IPv4Interface(f"{self.address}/{self.prefixlen}")

    def reply(self, kind: Kind, **fields: object) -> LeaseMessage:
        """A message of `kind` in the same transaction (xid, uuid, mac copied)."""
        return LeaseMessage(kind, self.xid, self.uuid, self.mac, **fields)  # type: ignore[arg-type]


def mac_to_bytes(mac: str) -> bytes:
    """'aa:bb:cc:dd:ee:ff' -> 6 bytes; raises MalformedMessage."""
    parts = mac.split(":")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise MalformedMessage(f"expected a MAC like aa:bb:cc:dd:ee:ff, got {mac!r}") from None
    if len(raw) != 6 or any(len(p) != 2 for p in parts):
        raise MalformedMessage(f"expected a MAC like aa:bb:cc:dd:ee:ff, got {mac!r}")
    return raw


def _tag(token: bytes, body: bytes) -> bytes:
    return hmac.new(token, body, hashlib.sha256).digest()[:TAG_LEN]


def encode(msg: LeaseMessage, token: bytes, now: float | None = None, nonce: bytes | None = None) -> bytes:
    """Serialise, stamp (`now`: the sender's wall clock in seconds, default time.time()) and sign `msg`.

    `nonce` defaults to a fresh random one: encode again for every datagram
    sent, resends included, or the receiver refuses the resend as a replay.
    Raises MalformedMessage for unencodable fields."""
    if not 0 <= msg.prefixlen <= 32:
        raise MalformedMessage(f"expected prefixlen 0..32, got {msg.prefixlen}")
    now = time.time() if now is None else now
    nonce = secrets.token_bytes(NONCE_LEN) if nonce is None else nonce
    if len(nonce) != NONCE_LEN or now < 0:
        raise MalformedMessage(f"expected a {NONCE_LEN}-byte nonce and a time after 1970")
    body = _BODY.pack(MAGIC, VERSION, int(msg.kind), int(msg.reason), msg.xid,
                      msg.uuid.bytes, mac_to_bytes(msg.mac), msg.address.packed,
                      msg.prefixlen, 0, msg.lease_secs, msg.head_addr.packed, msg.head_port, 0,
                      int(now * 1000), nonce)
    return body + _tag(token, body)


def decode(data: bytes, token: bytes) -> LeaseMessage:
    """Parse and verify one datagram. Raises MalformedMessage or BadSignature."""
    if len(data) != MESSAGE_LEN:
        raise MalformedMessage(f"expected {MESSAGE_LEN} bytes, got {len(data)}")
    body, tag = data[:_BODY.size], data[_BODY.size:]
    (magic, version, kind, reason, xid, raw_uuid, raw_mac, addr, prefixlen, res1,
     lease_secs, head_addr, head_port, res2, sent_at_ms, nonce) = _BODY.unpack(body)
    if magic != MAGIC:
        raise MalformedMessage(f"expected magic {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise MalformedMessage(f"expected version {VERSION}, got {version}")
    if not hmac.compare_digest(tag, _tag(token, body)):
        raise BadSignature("HMAC mismatch: unknown cluster token or altered message")
    try:
        kind_e = Kind(kind)
        reason_e = NakReason(reason)
    except ValueError as exc:
        raise MalformedMessage(str(exc)) from None
    if res1 or res2:
        raise MalformedMessage("expected reserved bytes to be zero")
    if prefixlen > 32:
        raise MalformedMessage(f"expected prefixlen 0..32, got {prefixlen}")
    if raw_mac == bytes(6) or raw_mac[0] & 1:
        raise MalformedMessage(f"expected a unicast MAC, got {raw_mac.hex(':')}")
    if (reason_e is NakReason.NONE) != (kind_e is not Kind.NAK):
        raise MalformedMessage(f"expected a reason exactly in NAK, got {kind_e.name}/{reason_e.name}")
    address = ipaddress.IPv4Address(addr)
    if kind_e is Kind.HELLO and address != ANY:
        raise MalformedMessage(f"expected no address in HELLO, got {address}")
    if kind_e in (Kind.REQUEST, Kind.OFFER, Kind.ACK) and address == ANY:
        raise MalformedMessage(f"expected an address in {kind_e.name}")
    return LeaseMessage(kind_e, xid, uuidlib.UUID(bytes=raw_uuid), raw_mac.hex(":"), address,
                        prefixlen, lease_secs, ipaddress.IPv4Address(head_addr), head_port, reason_e,
                        sent_at_ms / 1000, nonce)
