"""Name checks accept exactly the names they describe: a trailing newline
(which `re.match` with `$` lets through) is refused, naming the field, and
nothing is created or written (issue 9, 3.5)."""
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
