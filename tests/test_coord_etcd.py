"""The coordination client against a real 3-member etcd cluster with TLS.

Proves: the cluster starts in a few seconds; keys stay under /opie/CLUSTER/;
create-if-absent is one transaction whose create revision grows; a lease ends
its keys (expiry and revoke); a watch sees a change and is bounded when none
comes; clients without a certificate, or with one from another CA, are refused
by etcd; a dead or paused first endpoint does not stop calls (rotation).
"""
from __future__ import annotations

import shutil
import time

import pytest

from opie.discovery.coord import Coord
from opie.discovery.errors import CoordUnavailable, LeaseExpired
from opie.nbd import tls
from tests.etcd_support import CLUSTER, etcd_lab  # noqa: F401  (fixture)
from tests.proc_support import free_port

pytestmark = pytest.mark.timeout(60)   # a hang shows its stacks instead of eating the run


def test_three_members_start_in_a_few_seconds(etcd_lab):
    assert etcd_lab.started_in < 8.0, f"3-member cluster took {etcd_lab.started_in:.1f}s"
    assert all(m.healthy() for m in etcd_lab.cluster.members)


def test_keys_live_under_the_cluster_prefix(etcd_lab):
    c = etcd_lab.coord()
    other = Coord(etcd_lab.cluster.endpoints, "other", etcd_lab.head_tls)
    c.put("config/a", b"1")
    c.put("config/b", "2")
    other.put("config/a", b"x")
    assert c.get("config/a").value == b"1"
    assert [(kv.key, kv.value) for kv in c.get_prefix("config/")] == [("config/a", b"1"), ("config/b", b"2")]
    assert [kv.key for kv in other.get_prefix("config/")] == ["config/a"]
    raw = Coord(etcd_lab.cluster.endpoints, "x", etcd_lab.head_tls)
    raw.prefix = "/"
    assert raw.get(f"opie/{CLUSTER}/config/a").value == b"1"
    assert c.delete("config/a") == 1
    assert c.get("config/a") is None
    assert c.delete("config/a") == 0


def test_create_if_absent_and_create_revision_grows(etcd_lab):
    c = etcd_lab.coord()
    first = c.create("lock", b"a")
    assert first.created and first.kv.value == b"a"
    again = c.create("lock", b"b")
    assert not again.created
    assert again.kv == first.kv                      # the holder's key, unchanged
    assert c.get("lock").create_revision == first.kv.create_revision
    assert not c.delete_if("lock", first.kv.create_revision - 1)  # not the holder's revision
    assert c.delete_if("lock", first.kv.create_revision)
    second = c.create("lock", b"b")
    assert second.created and second.kv.create_revision > first.kv.create_revision


def test_raise_to_only_grows(etcd_lab):
    c = etcd_lab.coord()
    assert c.raise_to("counter", 7) == 7
    assert c.raise_to("counter", 12) == 12
    assert c.raise_to("counter", 9) == 12           # never lowered
    assert c.get("counter").value == b"12"


def test_lease_expiry_and_revoke_delete_keys(etcd_lab):
    c = etcd_lab.coord()
    short = c.grant(1)
    assert short.ttl >= 1
    start = c.put("expiring", b"x", lease=short.id)
    assert c.get("expiring").lease == short.id
    # No keepalive: the key goes when the lease expires (awaited by a bounded watch).
    events = []
    deadline = time.monotonic() + 10
    while not any(e.kind == "DELETE" for e in events) and time.monotonic() < deadline:
        events += c.watch("expiring", start_revision=start + 1, timeout=1.0)
    assert [e.kind for e in events] == ["DELETE"]
    with pytest.raises(LeaseExpired):
        c.keepalive(short.id)

    kept = c.grant(2)
    c.put("kept", b"y", lease=kept.id)
    assert c.keepalive(kept.id) == kept.ttl
    c.revoke(kept.id)
    assert c.get("kept") is None
    c.revoke(kept.id)                                # revoking twice is fine


def test_watch_sees_a_change_and_is_bounded(etcd_lab):
    c = etcd_lab.coord()
    revision = c.put("watched", b"0")
    began = time.monotonic()
    assert c.watch("watched", start_revision=revision + 1, timeout=0.5) == []
    assert time.monotonic() - began < 2.0
    c.put("watched", b"1")
    events = c.watch("watched", start_revision=revision + 1, timeout=2.0)
    assert [(e.kind, e.kv.value) for e in events] == [("PUT", b"1")]
    c.put("dir/x", b"2")
    events = c.watch("dir/", start_revision=revision + 1, timeout=2.0, prefix=True)
    assert [(e.kv.key, e.kv.value) for e in events] == [("dir/x", b"2")]


def test_client_without_certificate_is_refused(etcd_lab, tmp_path):
    no_cert = tmp_path / "no-cert"
    no_cert.mkdir()
    shutil.copy(etcd_lab.head_tls / tls.CA_CERT, no_cert / tls.CA_CERT)
    c = etcd_lab.coord(tls_dir=no_cert)
    with pytest.raises(CoordUnavailable, match="SSL|EOF|reset"):
        c.get("config/b")
    assert etcd_lab.coord().get("config/b").value == b"2"   # the same call with a certificate works


def test_client_with_certificate_from_another_ca_is_refused(etcd_lab, tmp_path):
    foreign_ca = tls.create_ca(tmp_path / "foreign-ca")
    foreign = tls.issue(foreign_ca, tmp_path / "foreign", client_name="intruder", role="head")
    shutil.copy(etcd_lab.head_tls / tls.CA_CERT, foreign / tls.CA_CERT)  # trusts the real servers
    c = etcd_lab.coord(tls_dir=foreign)
    with pytest.raises(CoordUnavailable, match="SSL|EOF|reset"):
        c.put("config/b", b"evil")
    assert etcd_lab.coord().get("config/b").value == b"2"


def test_rotation_past_a_dead_first_endpoint(etcd_lab):
    dead = f"https://127.0.0.1:{free_port()}"
    c = etcd_lab.coord(endpoints=[dead, *etcd_lab.cluster.endpoints])
    c.put("rotated", b"1")
    assert c.get("rotated").value == b"1"
    assert c.endpoints[c._current] != dead             # it stays on the endpoint that answered


def test_rotation_past_a_paused_first_member(etcd_lab):
    """A SIGSTOPped member accepts TCP and says nothing: the timeout moves on."""
    first = etcd_lab.cluster.members[0]
    c = etcd_lab.coord(timeout=0.5)
    c.put("paused", b"0")
    etcd_lab.pause(first)
    try:
        began = time.monotonic()
        c._current = 0
        c.put("paused", b"1")
        assert c.get("paused").value == b"1"
        assert time.monotonic() - began < 3 * c.timeout + 1.0
    finally:
        etcd_lab.heal()


def test_every_endpoint_dead_fails_bounded(etcd_lab):
    c = Coord([f"https://127.0.0.1:{free_port()}", f"https://127.0.0.1:{free_port()}"], CLUSTER,
              etcd_lab.head_tls, timeout=0.5)
    began = time.monotonic()
    with pytest.raises(CoordUnavailable, match="no etcd endpoint"):
        c.get("anything")
    assert time.monotonic() - began < 2.0
