"""ISU TXT records, the head's classification, and the heartbeat codec (pure)."""
from __future__ import annotations

import time
import uuid as uuidlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opie.discovery import heartbeat
from opie.discovery.record import BadAnnouncement, IsuClass, IsuRecord, classify, from_txt

U = "33333333-3333-4333-8333-333333333333"


def txt(record: IsuRecord) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in record.to_txt().items()}


def test_txt_round_trip() -> None:
    record = IsuRecord(U, "10.0.0.5", 10809, 4000, state="degraded", disks=3, capacity=3 * 2**40,
                       version="0.1.0", config_gen=7, cluster="c1", role="member", name="isu3")
    assert from_txt(txt(record), "10.0.0.5", 10809) == record


@pytest.mark.parametrize("key, value", [
    ("uuid", b"not-a-uuid"), ("uuid", None), ("disks", b"-1"), ("disks", b"two"),
    ("hb", b"0"), ("hb", b"70000"), ("role", b"boss"), ("state", b"\xff\xfe"),
    ("name", b"a\x00b"), ("version", b"x" * 201),
])
def test_bad_txt_is_refused(key: str, value: bytes | None) -> None:
    props = txt(IsuRecord(U, "10.0.0.5", 10809, 4000))
    if value is None:
        del props[key.encode()]
    else:
        props[key.encode()] = value
    with pytest.raises(BadAnnouncement):
        from_txt(props, "10.0.0.5", 10809)


@pytest.mark.parametrize("cluster, role, expected", [
    ("", "", IsuClass.NEW), ("", "member", IsuClass.NEW), ("c1", "", IsuClass.NEW),
    ("c1", "member", IsuClass.MEMBER), ("c1", "spare", IsuClass.SPARE),
    ("c2", "member", IsuClass.FOREIGN), ("c2", "", IsuClass.FOREIGN),
])
def test_classification(cluster: str, role: str, expected: IsuClass) -> None:
    assert classify(IsuRecord(U, "10.0.0.5", 1, 2, cluster=cluster, role=role), "c1") is expected


def test_heartbeat_round_trip_and_refusals() -> None:
    beat = heartbeat.Beat(heartbeat.PONG, 42, uuidlib.UUID(U))
    data = heartbeat.encode(beat)
    assert heartbeat.decode(data) == beat
    for bad in (data[:-1], b"XXXX" + data[4:], data[:8] + b"\xff" + data[9:]):
        with pytest.raises(heartbeat.BadHeartbeat):
            heartbeat.decode(bad)


@given(st.binary(max_size=64))
def test_heartbeat_decode_fails_only_with_bad_heartbeat(data: bytes) -> None:
    try:
        heartbeat.decode(data)
    except heartbeat.BadHeartbeat:
        pass


def test_liveness_monitor_declares_dead_once_and_alive_again() -> None:
    """A responder on loopback; stopping it makes the ISU dead, restarting alive again."""
    events: list[tuple[str, str]] = []
    u = uuidlib.UUID(U)
    with heartbeat.LivenessMonitor(lambda uid, silent: events.append(("dead", uid)),
                                   lambda uid: events.append(("alive", uid)),
                                   bind_address="127.0.0.1", interval=0.05, timeout=0.3) as mon:
        responder = heartbeat.HeartbeatResponder(u, "127.0.0.1")
        responder.start()
        port = responder.port
        # A responder for another UUID on the same address does not count.
        other = heartbeat.HeartbeatResponder(uuidlib.uuid4(), "127.0.0.1")
        other.start()
        mon.watch(U, ("127.0.0.1", port))
        mon.watch(str(uuidlib.UUID(int=1)), ("127.0.0.1", other.port))
        time.sleep(0.6)
        assert mon.is_alive(U) and not mon.is_alive(str(uuidlib.UUID(int=1)))
        responder.close()
        time.sleep(0.6)
        assert not mon.is_alive(U)
        revived = heartbeat.HeartbeatResponder(u, "127.0.0.1", port)
        revived.start()
        time.sleep(0.4)
        assert mon.is_alive(U)
        revived.close()
        other.close()
    assert [e for e in events if e[1] == U] == [("dead", U), ("alive", U)]


def test_a_starved_monitor_does_not_declare_deaths_it_caused() -> None:
    """Decisions on an injected clock: a 1.9 s gap in the monitor's own ticks is not
    the ISU's silence; one normal tick later the silence counts."""
    now = [100.0]
    dead: list[str] = []
    mon = heartbeat.LivenessMonitor(lambda uid, silent: dead.append(uid), lambda uid: None,
                                    bind_address="127.0.0.1", interval=0.25, timeout=1.5,
                                    clock=lambda: now[0])
    try:
        mon.watch(U, ("127.0.0.1", 9))       # nobody answers there
        for t in (100.0, 100.25, 100.5):
            now[0] = t
            mon.tick()
        now[0] = 102.4                        # the monitor thread was starved for 1.9 s
        mon.tick()
        assert dead == [] and mon.is_alive(U)
        now[0] = 102.65
        mon.tick()
        assert dead == [U] and not mon.is_alive(U)
        now[0] = 102.9
        mon.tick()
        assert dead == [U]                    # reported once
    finally:
        mon.close()
