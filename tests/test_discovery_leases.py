"""Address leases without sockets: the wire codec, the pool rules, the server's refusals.

Hostile input (forged, damaged, malformed datagrams; requests outside the
pool; a UUID or MAC claimed twice) must be refused, logged, and leave the
leases file byte-for-byte unchanged.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import uuid as uuidlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opie.discovery.lease_pool import IntegrityError, LeasePool, LeaseRefused, load_leases, parse_pool
from opie.discovery.lease_proto import (MESSAGE_LEN, BadSignature, Kind, LeaseMessage, LeaseProtocolError,
                                        MalformedMessage, NakReason, ReplayedMessage, decode, encode)
from opie.discovery.lease_replay import ReplayGuard
from opie.discovery.lease_server import LeaseServer

TOKEN = b"cluster-token-for-tests"
A = uuidlib.UUID("11111111-1111-4111-8111-111111111111")
B = uuidlib.UUID("22222222-2222-4222-8222-222222222222")
MAC_A, MAC_B, MAC_X = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:ff"
IP = ipaddress.IPv4Address
SENDER = ("0.0.0.0", 7868)


def request(u: uuidlib.UUID, mac: str, address: str, xid: int = 7) -> LeaseMessage:
    return LeaseMessage(Kind.REQUEST, xid, u, mac, IP(address), 24)


# -- codec ------------------------------------------------------------------

def test_every_kind_round_trips() -> None:
    msgs = [LeaseMessage(Kind.HELLO, 1, A, MAC_A),
            LeaseMessage(Kind.OFFER, 2, A, MAC_A, IP("10.0.0.5"), 24, 600, IP("10.0.0.1"), 8080),
            request(A, MAC_A, "10.0.0.5"),
            LeaseMessage(Kind.ACK, 4, A, MAC_A, IP("10.0.0.5"), 24, 600, IP("10.0.0.1"), 8080),
            LeaseMessage(Kind.NAK, 5, A, MAC_A, reason=NakReason.OUT_OF_POOL)]
    for msg in msgs:
        data = encode(msg, TOKEN)
        assert len(data) == MESSAGE_LEN
        assert decode(data, TOKEN) == msg


def test_another_clusters_token_is_a_bad_signature() -> None:
    with pytest.raises(BadSignature):
        decode(encode(LeaseMessage(Kind.HELLO, 1, A, MAC_A), b"other cluster"), TOKEN)


@pytest.mark.parametrize("data, error", [
    (b"", MalformedMessage),
    (b"OPLS\x01\x01", MalformedMessage),
    (b"XXXX" + bytes(MESSAGE_LEN - 4), MalformedMessage),
    (b"OPLS\x03" + bytes(MESSAGE_LEN - 5), MalformedMessage),     # version 3
    (b"OPLS\x01" + bytes(MESSAGE_LEN - 5), MalformedMessage),     # version 1: no stamp, no nonce
    (b"OPLS\x01" + bytes(63), MalformedMessage),                  # a whole version-1 datagram
    (b"OPLS\x02" + bytes(MESSAGE_LEN - 5), BadSignature),         # right shape, no tag
    (bytes(MESSAGE_LEN + 1), MalformedMessage),
])
def test_malformed_datagrams_are_refused(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(data, TOKEN)


def _resign(body: bytes) -> bytes:
    import hashlib
    import hmac
    return body + hmac.new(TOKEN, body, hashlib.sha256).digest()[:16]


@pytest.mark.parametrize("offset, value, why", [
    (5, 9, "unknown kind"), (7, 1, "reason outside NAK"), (39, 1, "reserved"),
    (38, 33, "prefixlen"), (28, 0x01, "multicast MAC"), (34, 10, "address in HELLO"),
])
def test_signed_but_invalid_fields_are_refused(offset: int, value: int, why: str) -> None:
    body = bytearray(encode(LeaseMessage(Kind.HELLO, 1, A, MAC_A), TOKEN)[:-16])
    body[offset] = value
    with pytest.raises(MalformedMessage):
        decode(_resign(bytes(body)), TOKEN)


@given(st.binary(max_size=2 * MESSAGE_LEN))
def test_decode_fails_only_with_protocol_errors(data: bytes) -> None:
    try:
        decode(data, TOKEN)
    except LeaseProtocolError:
        pass


@given(st.integers(0, MESSAGE_LEN - 1), st.integers(1, 255))
def test_any_flipped_byte_is_refused(offset: int, flip: int) -> None:
    data = bytearray(encode(request(A, MAC_A, "10.0.0.5"), TOKEN))
    data[offset] ^= flip
    with pytest.raises(LeaseProtocolError):
        decode(bytes(data), TOKEN)


# -- pool -------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_pool(tmp_path: Path, spec: str = "10.0.0.10-12", **kw: object) -> LeasePool:
    return LeasePool(str(tmp_path / "leases.json"), parse_pool(spec), 24, lease_secs=100, **kw)  # type: ignore[arg-type]


def test_parse_pool_forms() -> None:
    assert parse_pool("10.0.0.10-12") == [IP("10.0.0.10"), IP("10.0.0.11"), IP("10.0.0.12")]
    assert parse_pool("10.0.0.10-10.0.0.11") == [IP("10.0.0.10"), IP("10.0.0.11")]
    assert len(parse_pool("10.0.0.0/29")) == 6
    with pytest.raises(ValueError):
        parse_pool("10.0.0.12-10")


def test_leases_are_distinct_persisted_sticky_and_renewed(tmp_path: Path) -> None:
    clock = Clock()
    pool = make_pool(tmp_path, clock=clock)
    a = pool.offer(str(A), MAC_A)
    b = pool.offer(str(B), MAC_B)
    assert a != b
    pool.commit(str(A), MAC_A, a)
    pool.commit(str(B), MAC_B, b)
    reloaded = make_pool(tmp_path, clock=clock)
    assert {x.uuid: x.address for x in reloaded.leases()} == {str(A): str(a), str(B): str(b)}
    clock.now += 60
    renewed = reloaded.commit(str(A), MAC_A, a)
    assert renewed.expires == clock.now + 100
    clock.now += 500                       # both expired; A still gets its old address back
    assert reloaded.offer(str(A), MAC_A) == a


def test_pool_exhaustion_and_reuse_after_expiry(tmp_path: Path) -> None:
    clock = Clock()
    pool = make_pool(tmp_path, "10.0.0.10-11", clock=clock)
    for n in range(2):
        u, mac = str(uuidlib.uuid4()), f"02:00:00:00:01:{n:02x}"
        pool.commit(u, mac, pool.offer(u, mac))
    with pytest.raises(LeaseRefused) as info:
        pool.offer(str(A), MAC_A)
    assert info.value.reason is NakReason.POOL_EXHAUSTED
    clock.now += 101
    assert pool.offer(str(A), MAC_A) in parse_pool("10.0.0.10-11")


def test_an_address_that_answers_arp_is_never_offered(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, probe=lambda address: address == IP("10.0.0.10"))
    assert pool.offer(str(A), MAC_A) == IP("10.0.0.11")
    with pytest.raises(LeaseRefused) as info:
        pool.commit(str(B), MAC_B, IP("10.0.0.10"))
    assert info.value.reason is NakReason.ADDRESS_CONFLICT


@pytest.mark.parametrize("who, mac, address, reason", [
    (str(B), MAC_B, "10.0.0.99", NakReason.OUT_OF_POOL),
    (str(A), MAC_X, "10.0.0.11", NakReason.DUPLICATE_UUID),      # A already holds .10 under MAC_A
    (str(B), MAC_A, "10.0.0.11", NakReason.DUPLICATE_MAC),
    (str(B), MAC_B, "10.0.0.10", NakReason.ADDRESS_TAKEN),
])
def test_refused_requests_change_nothing(tmp_path: Path, who: str, mac: str, address: str,
                                         reason: NakReason) -> None:
    pool = make_pool(tmp_path)
    pool.commit(str(A), MAC_A, IP("10.0.0.10"))
    path = tmp_path / "leases.json"
    before = path.read_bytes()
    with pytest.raises(LeaseRefused) as info:
        pool.commit(who, mac, IP(address))
    assert info.value.reason is reason
    assert path.read_bytes() == before
    assert [x.address for x in pool.leases()] == ["10.0.0.10"]


def test_a_damaged_leases_file_is_refused(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    pool.commit(str(A), MAC_A, pool.offer(str(A), MAC_A))
    path = tmp_path / "leases.json"
    doc = json.loads(path.read_text())
    doc["leases"][0]["address"] = "10.0.0.12"          # edited without fixing the crc
    path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="crc32"):
        load_leases(str(path))
    path.write_text("{not json")
    with pytest.raises(IntegrityError):
        make_pool(tmp_path)


# -- server decisions (no socket) ---------------------------------------------

def test_server_refuses_and_logs_hostile_input_without_touching_leases(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(tmp_path)
    server = LeaseServer(pool, TOKEN, "eth0", head=("10.0.0.1", 8080))
    offer = server.handle(encode(LeaseMessage(Kind.HELLO, 1, A, MAC_A), TOKEN), SENDER)
    assert offer is not None and offer.kind is Kind.OFFER and offer.head_port == 8080
    ack = server.handle(encode(request(A, MAC_A, str(offer.address), xid=1), TOKEN), SENDER)
    assert ack is not None and ack.kind is Kind.ACK and ack.address == offer.address
    path = tmp_path / "leases.json"
    before = path.read_bytes()

    caplog.set_level(logging.WARNING, logger="opie.discovery.lease_server")
    hostile = [
        encode(LeaseMessage(Kind.HELLO, 2, B, MAC_B), b"forged"),        # forged
        b"OPLS\x01" + bytes(10),                                          # malformed
        encode(LeaseMessage(Kind.ACK, 3, B, MAC_B, IP("10.0.0.11"), 24), TOKEN),  # server-only kind
    ]
    for data in hostile:
        assert server.handle(data, SENDER) is None
    naks = [server.handle(encode(request(B, MAC_B, "10.0.0.200"), TOKEN), SENDER),
            server.handle(encode(LeaseMessage(Kind.HELLO, 4, A, MAC_X), TOKEN), SENDER),
            server.handle(encode(request(A, MAC_X, "10.0.0.11"), TOKEN), SENDER)]
    assert [n.reason if n else None for n in naks] == [
        NakReason.OUT_OF_POOL, NakReason.DUPLICATE_UUID, NakReason.DUPLICATE_UUID]
    assert all(n is not None and n.kind is Kind.NAK for n in naks)
    assert server.refusals == 6
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 6 and any("HMAC" in m for m in refused) and any("OUT_OF_POOL" in m for m in refused)
    assert path.read_bytes() == before


# -- pool invariants under random traffic ----------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["offer", "commit", "commit_any", "tick"]),
                         st.integers(0, 4), st.integers(0, 4), st.integers(10, 14)),
               max_size=40)


@settings(deadline=None, max_examples=60)  # every commit fsyncs; timing varies on a shared VM
@given(OPS)
def test_pool_never_double_leases(tmp_path_factory: pytest.TempPathFactory,
                                  ops: list[tuple[str, int, int, int]]) -> None:
    """Whatever hellos and requests arrive (UUIDs and MACs mixed freely, time passing),
    no two unexpired leases share an address, a UUID or a MAC, and the file always
    holds exactly what the pool holds in memory."""
    tmp = tmp_path_factory.mktemp("pool")
    clock = Clock()
    pool = make_pool(tmp, "10.0.0.10-13", clock=clock)
    uuids = [str(uuidlib.UUID(int=n + 1)) for n in range(5)]
    macs = [f"02:00:00:00:00:{n:02x}" for n in range(5)]
    for op, who, mac, host in ops:
        try:
            if op == "offer":
                pool.offer(uuids[who], macs[mac])
            elif op == "commit":
                pool.commit(uuids[who], macs[mac], pool.offer(uuids[who], macs[mac]))
            elif op == "commit_any":
                pool.commit(uuids[who], macs[mac], IP(f"10.0.0.{host}"))
            else:
                clock.now += 40
        except LeaseRefused:
            pass
        live = [x for x in pool.leases() if x.expires > clock.now]
        for key in ("address", "uuid", "mac"):
            values = [getattr(x, key) for x in live]
            assert len(values) == len(set(values)), (key, live)
        assert all(IP(x.address) in parse_pool("10.0.0.10-13") for x in pool.leases())
        assert load_leases(str(tmp / "leases.json")) == pool.leases()


# -- replay ---------------------------------------------------------------------

def test_a_replayed_correctly_signed_message_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A REQUEST captured off the segment and sent again (at once, or after its lease
    expired) is refused without an answer, and the leases file stays byte-identical;
    only the transaction id, which the sender chooses, guarded against that before."""
    import time
    clock = Clock()
    clock.now = time.time()  # messages are stamped with the wall clock; the server reads the pool's
    pool = make_pool(tmp_path, clock=clock)
    server = LeaseServer(pool, TOKEN, "eth0", head=("10.0.0.1", 8080))
    offer = server.handle(encode(LeaseMessage(Kind.HELLO, 9, A, MAC_A), TOKEN), SENDER)
    assert offer is not None and offer.kind is Kind.OFFER
    captured = encode(request(A, MAC_A, str(offer.address), xid=9), TOKEN)
    ack = server.handle(captured, SENDER)
    assert ack is not None and ack.kind is Kind.ACK
    path = tmp_path / "leases.json"
    before = path.read_bytes()
    caplog.set_level(logging.WARNING, logger="opie.discovery.lease_server")
    assert server.handle(captured, SENDER) is None            # replayed at once
    clock.now += 3600                                          # A's lease of 100 s has expired
    assert server.handle(captured, SENDER) is None            # replayed to take the address back
    assert path.read_bytes() == before
    assert server.refusals == 2
    assert sum("replay" in r.getMessage() for r in caplog.records) == 2


def test_replay_guard_window_and_seen_set() -> None:
    """Fresh and new: accepted once. Too old, too far ahead, or a nonce seen in the window: refused.
    A nonce is forgotten once it is out of the window (the window refuses it by then)."""
    clock = Clock()
    guard = ReplayGuard(window=30, clock=clock)

    def stamped(at: float, nonce: bytes) -> LeaseMessage:
        return decode(encode(LeaseMessage(Kind.HELLO, 1, A, MAC_A), TOKEN, now=at, nonce=nonce), TOKEN)
    guard.check(stamped(clock.now - 29, b"n1" * 4))
    for msg in (stamped(clock.now - 29, b"n1" * 4), stamped(clock.now - 31, b"n2" * 4),
                stamped(clock.now + 31, b"n3" * 4)):
        with pytest.raises(ReplayedMessage):
            guard.check(msg)
    guard.check(stamped(clock.now + 29, b"n3" * 4))   # a refused message was not recorded
    clock.now += 100
    guard.check(stamped(clock.now, b"n1" * 4))        # same nonce, fresh stamp, long after: accepted
