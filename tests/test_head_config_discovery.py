"""The head config's discovery fields: old configs load unchanged, a member list may be
empty only with discovery, bad discovery fields are refused naming the field, and
members found by discovery at boot are never written back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from opie.head import config as head_config
from opie.head.config import ConfigError, HeadConfig

UUID = "3f2a6c1e-8d7b-4c1a-9e0f-0123456789ab"


def discovering(**changes: object) -> HeadConfig:
    base: dict = {"members": [], "tls_dir": None, "mount_root": "/mnt/opie", "discover": True,
                  "cluster_id": "c1", "discover_members": 4}
    base.update(changes)
    return HeadConfig(**base)


def test_a_config_without_discovery_fields_loads_as_before(tmp_path: Path) -> None:
    old = {"magic": "opie-head", "version": 1, "members": ["nbd://a:1/d", "nbd://b:1/d", "nbd://c:1/d"],
           "tls_dir": None, "mount_root": "/mnt/opie"}
    (tmp_path / head_config.FILENAME).write_text(json.dumps(old))
    cfg = head_config.load(tmp_path)
    assert (cfg.discover, cfg.cluster_id, cfg.isus, cfg.lease_pool) == (False, "", [], None)


@pytest.mark.parametrize("changes, field", [
    ({"discover": False}, "members"),
    ({"cluster_id": ""}, "cluster_id"),
    ({"cluster_id": "has space"}, "cluster_id"),
    ({"lease_pool": "10.0.0.100-120"}, "lease_token_file"),
    ({"isus": [{"uuid": UUID, "role": "boss", "exports": []}]}, "isus"),
    ({"isus": [{"uuid": UUID, "role": "member", "exports": ["d"]}] * 2}, "isus"),
])
def test_bad_discovery_fields_are_refused_by_name(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        discovering(**changes).validate()


def test_members_found_at_boot_are_not_written_back(tmp_path: Path) -> None:
    cfg = discovering(isus=[{"uuid": UUID, "role": "member", "exports": ["disk0"]}])
    head_config.save(tmp_path, cfg)
    cfg.members = ["nbd://10.0.0.100:10809/disk0", "nbd://10.0.0.101:10809/disk0"]
    cfg.discovered_members = True   # what head/daemon.py sets after head/cluster.py found them
    head_config.save(tmp_path, cfg)
    again = head_config.load(tmp_path)
    assert again.members == [] and again.isus == cfg.isus
