"""Bad config input is refused naming the field, and nothing is created or
written (issue 9): names with a trailing newline (which `re.match` with `$`
lets through, 3.5), numbers of the wrong type in head.json (3.6)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from opie.head import config as head_config
from opie.head.config import ConfigError
from opie.isu.disks import Disk, DiskError, DiskSpec


def head_json(**changes: object) -> dict:
    body: dict = {"magic": "opie-head", "version": 1,
                  "members": ["nbd://a:1/d", "nbd://b:1/d", "nbd://c:1/d"],
                  "tls_dir": None, "mount_root": "/mnt/opie"}
    body.update(changes)
    return body


@pytest.mark.parametrize("changes, field", [
    ({"name": "head0\n"}, "name"),
    ({"volumes": [{"name": "vol0\n", "size": 1 << 20}]}, "volumes"),
])
def test_head_config_names_with_a_newline_are_refused(tmp_path: Path, changes: dict, field: str) -> None:
    path = tmp_path / head_config.FILENAME
    path.write_text(json.dumps(head_json(**changes)))
    before = path.read_bytes()
    with pytest.raises(ConfigError) as info:
        head_config.load(tmp_path)
    assert f": {field}: " in str(info.value)
    assert path.read_bytes() == before


def test_isu_disk_named_with_a_newline_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "disk0\n.img"
    with pytest.raises(DiskError) as info:
        Disk(DiskSpec(str(path), 1 << 20))
    assert "export name" in str(info.value)
    assert not path.exists()


@pytest.mark.parametrize("changes, field", [
    ({"chunk_size": "65536"}, "chunk_size"),
    ({"chunk_size": 65536.0}, "chunk_size"),
    ({"chunk_size": None}, "chunk_size"),
    ({"rebuild_rate": "fast"}, "rebuild_rate"),
    ({"members": [], "discover": True, "cluster_id": "c1", "discover_members": "4"}, "discover_members"),
    ({"discover": True, "cluster_id": "c1", "discover_timeout": "long"}, "discover_timeout"),
    ({"lease_secs": "3600"}, "lease_secs"),
    ({"lease_prefixlen": 33}, "lease_prefixlen"),
])
def test_head_config_numbers_of_the_wrong_type_are_config_errors(tmp_path: Path, changes: dict,
                                                                 field: str) -> None:
    """A number field holding a string, float or null is a ConfigError naming it, not a TypeError."""
    (tmp_path / head_config.FILENAME).write_text(json.dumps(head_json(**changes)))
    with pytest.raises(ConfigError) as info:
        head_config.load(tmp_path)
    assert f": {field}: " in str(info.value)
