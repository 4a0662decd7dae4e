"""head.json's `ha` section (head/config.py HAConfig): off by default, and every
bad field refused by name with nothing written; the timeline's step records."""
from __future__ import annotations

import json

import pytest

from opie.head import config as head_config
from opie.head.ha.timeline import Timeline

MEMBERS = ["nbds://127.0.0.1:10809/disk0", "nbds://127.0.0.1:10810/disk0", "nbds://127.0.0.1:10811/disk0"]
GOOD_HA = {"etcd": ["https://127.0.0.1:2379", "https://127.0.0.1:2381"], "cluster": "c1",
           "service_address": "10.0.0.100", "service_interface": "eth0", "client_ports": [445],
           "mirror_listen": "0.0.0.0:7870", "mirror_peer": "10.0.0.3:7870",
           "control": {MEMBERS[0]: "127.0.0.1:7001"}}


def body(**changes) -> dict:
    obj = {"magic": "opie-head", "version": 1, "members": MEMBERS, "tls_dir": "/etc/opie/tls",
           "mount_root": "/mnt/opie"}
    obj.update(changes)
    return obj


def test_without_ha_the_head_is_a_single_head():
    cfg = head_config.from_json(body())
    assert cfg.ha is None
    assert cfg.to_json()["ha"] is None
    assert head_config.from_json(cfg.to_json()).ha is None


def test_a_good_section_round_trips_through_head_json(tmp_path):
    cfg = head_config.from_json(body(ha=GOOD_HA))
    assert isinstance(cfg.ha, head_config.HAConfig)
    assert (cfg.ha.lease_ttl, cfg.ha.control) == (2, {MEMBERS[0]: "127.0.0.1:7001"})
    head_config.save(tmp_path, cfg)
    again = head_config.load(tmp_path)
    assert again.ha == cfg.ha
    assert json.loads((tmp_path / "head.json").read_text())["ha"]["etcd"] == GOOD_HA["etcd"]


@pytest.mark.parametrize("change, field", [
    ({"ha": []}, "ha:"),
    ({"ha": {"cluster": "c1"}}, "ha.etcd: required"),
    ({"ha": {"etcd": ["https://127.0.0.1:2379"]}}, "ha.cluster: required"),
    ({"ha": {**GOOD_HA, "etcd": []}}, "ha.etcd"),
    ({"ha": {**GOOD_HA, "etcd": ["http://127.0.0.1:2379"]}}, "ha.etcd"),
    ({"ha": {**GOOD_HA, "etcd": "https://127.0.0.1:2379"}}, "ha.etcd"),
    ({"ha": {**GOOD_HA, "cluster": "a b"}}, "ha.cluster"),
    ({"ha": {**GOOD_HA, "lease_ttl": 0}}, "ha.lease_ttl"),
    ({"ha": {**GOOD_HA, "lease_ttl": "2"}}, "ha.lease_ttl"),
    ({"ha": {**GOOD_HA, "service_address": "10.0.0.300"}}, "ha.service_address"),
    ({"ha": {**GOOD_HA, "service_interface": None}}, "ha.service_interface"),
    ({"ha": {**GOOD_HA, "client_ports": [0]}}, "ha.client_ports"),
    ({"ha": {**GOOD_HA, "client_ports": ["445"]}}, "ha.client_ports"),
    ({"ha": {**GOOD_HA, "mirror_listen": "nowhere"}}, "ha.mirror_listen"),
    ({"ha": {**GOOD_HA, "mirror_peer": 7870}}, "ha.mirror_peer"),
    ({"ha": {**GOOD_HA, "control": {MEMBERS[0]: "host"}}}, "ha.control["),
    ({"ha": {**GOOD_HA, "control": {"nbds://elsewhere:1/x": "h:1"}}}, "ha.control: nbds://elsewhere"),
    ({"ha": {**GOOD_HA, "control": ["h:1"]}}, "ha.control"),
    ({"ha": {**GOOD_HA, "leader": "me"}}, "ha.leader: unknown field"),
    ({"ha": {**GOOD_HA, "control": {}}, "tls_dir": None,
      "members": ["nbd://127.0.0.1:1/a", "nbd://127.0.0.1:2/a"]}, "ha: needs tls_dir"),
])
def test_a_bad_field_is_refused_by_name_and_nothing_is_written(tmp_path, change, field):
    path = tmp_path / head_config.FILENAME
    path.write_text(json.dumps(body()))
    before = path.read_bytes()
    with pytest.raises(head_config.ConfigError) as refused:
        head_config.from_json(body(**change))
    assert field in str(refused.value)
    path.write_text(json.dumps(body(**change)))
    with pytest.raises(head_config.ConfigError):
        head_config.load(tmp_path)
    path.write_bytes(before)
    assert head_config.load(tmp_path).ha is None


def test_the_timeline_records_each_step_and_a_failed_one_with_its_error():
    now = [100.0]
    tl = Timeline("head-b", 42, clock=lambda: now[0])
    with tl.step("fence") as d:
        now[0] += 0.25
        d["acknowledged"] = 3
    with pytest.raises(OSError):
        with tl.step("connect"):
            now[0] += 0.5
            raise OSError("member gone")
    assert tl.to_json()["steps"] == [{"step": "fence", "seconds": 0.25, "acknowledged": 3},
                                     {"step": "connect", "seconds": 0.5, "error": "member gone"}]
    assert tl.seconds == 0.75 and tl.to_json()["epoch"] == 42
