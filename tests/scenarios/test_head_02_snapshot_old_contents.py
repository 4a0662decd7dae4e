"""Scenario head-02: files overwritten after a snapshot.

Does: write files, take a snapshot (filesystem frozen), overwrite and delete
them in the live volume.
Must hold: the snapshot shows the old contents, both through its NBD export
(an image copied with nbdcopy, read with debugfs, no mount involved) and
through a read-only mount; the live volume shows the new contents; the
snapshot refuses writes; deleting it gives its space back.
"""
from __future__ import annotations

import errno
import hashlib
import subprocess
from pathlib import Path

import pytest

from scenario_support import nbdcopy_out, sha256_of, write_file


def test_snapshot_keeps_old_contents(head_lab, tmp_path):
    lab, api = head_lab
    mnt = lab.dir / "mnt" / "vol0"
    d = mnt / "s02"
    d.mkdir()
    old = {f"a{i}": write_file(d / f"a{i}", 200_000 + i * 70_000, seed=100 + i) for i in range(4)}

    snap = api.call("POST", "/v1/snapshots", {"volume": "vol0", "name": "s02"})
    assert snap["export"].endswith("/vol0@s02")

    new = {name: write_file(d / name, 150_000, seed=200 + i) for i, name in enumerate(old)}
    (d / "a3").unlink()
    del new["a3"]

    # 1. through the snapshot's NBD export, no mount: debugfs reads the image
    image = tmp_path / "snap.img"
    nbdcopy_out(snap["export"], lab.lab["tls_certificates"], image)
    for name, digest in old.items():
        out = subprocess.run(["debugfs", "-R", f"cat /s02/{name}", str(image)], capture_output=True,
                             check=True, timeout=60).stdout
        assert hashlib.sha256(out).hexdigest() == digest, name

    # 2. through a read-only mount
    m = api.call("POST", "/v1/snapshots/vol0/s02/mount", {})
    # the lab's share shows previous versions, so the head already mounted it
    # where Samba looks (VOLUME/.snapshots/@GMT-...); otherwise under the mount root
    ro = Path(m["mountpoint"])
    assert m["read_only"] and m["state"] == "mounted"
    assert ro in (lab.dir / "mnt" / "vol0@s02", ) or ro.parent == lab.dir / "mnt" / "vol0" / ".snapshots"
    for name, digest in old.items():
        assert sha256_of(ro / "s02" / name) == digest
    with pytest.raises(OSError) as ei:
        (ro / "s02" / "new").write_bytes(b"x")
    assert ei.value.errno == errno.EROFS

    # the live volume has the new contents
    for name, digest in new.items():
        assert sha256_of(d / name) == digest
    assert not (d / "a3").exists()

    # delete: unmounted, unexported, space back
    before = api.status()
    (info,) = before["volumes"][0]["snapshots"]
    assert info["exclusive_bytes"] > 0  # the overwrites really copied on write
    api.call("DELETE", "/v1/snapshots/vol0/s02")
    st = api.status()
    assert st["volumes"][0]["snapshots"] == []
    assert st["pool"]["used_bytes"] <= before["pool"]["used_bytes"] - info["exclusive_bytes"]
    assert not any(str(ro) in line for line in open("/proc/mounts"))
