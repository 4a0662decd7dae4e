"""Scenario head-03: a full backup, a small change, an incremental backup,
then a restore over a damaged volume.

Must hold: the second run copies only the segments the mapping table says
changed (counted, and checked against the segments that really differ
between the two images), far fewer than the first; only the newest backup
snapshot is kept; the restore verifies and the volume then equals the backup
image byte for byte.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from scenario_support import nbdcopy_out, sha256_of, write_file


def opie(lab, *args):
    res = subprocess.run([sys.executable, "-m", "opie.cli.main", *args, "--lab", str(lab.dir)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def differing_segments(a, b, seg):
    n = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(seg), fb.read(seg)
            if not x and not y:
                return n
            n += x != y


def test_incremental_backup_and_restore(head_lab, tmp_path):
    lab, api = head_lab
    mnt = lab.dir / "mnt" / "vol0"
    d = mnt / "s03"
    d.mkdir()
    digests = {f"b{i}": write_file(d / f"b{i}", 1_000_000, seed=300 + i) for i in range(8)}
    target = tmp_path / "backups"
    target.mkdir()

    first = json.loads(opie(lab, "backup", "run", "vol0", "--to", str(target), "--json").stdout)
    assert first["kind"] == "full"
    image1 = tmp_path / "image1"
    shutil.copy(target / "vol0.img", image1)

    digests["b2"] = write_file(d / "b2", 1_000_000, seed=999)  # change one file
    second = json.loads(opie(lab, "backup", "run", "vol0", "--to", str(target), "--json").stdout)
    assert second["kind"] == "incremental" and second["base"] == first["snapshot"]
    seg = api.status()["pool"]["segment_size"]
    differ = differing_segments(image1, target / "vol0.img", seg)
    assert 0 < differ <= second["segments_copied"]
    assert second["segments_copied"] <= 8  # one file and ext4's metadata, not the volume
    assert second["segments_copied"] * 4 < first["segments_copied"]
    snaps = [s["name"] for s in api.status()["volumes"][0]["snapshots"]]
    assert snaps == [second["snapshot"]]  # the older backup snapshot is gone

    # damage the live volume, then restore it from the backup
    for name in digests:
        write_file(d / name, 1_000_000, seed=5000)
    api.call("POST", "/v1/volumes/vol0/unmount")
    try:
        res = json.loads(opie(lab, "backup", "restore", "vol0", "--from", str(target), "--json").stdout)
        assert res["verified"] is True
        out = tmp_path / "restored.img"
        nbdcopy_out(api.status()["volumes"][0]["export"], lab.lab["tls_certificates"], out)
        assert sha256_of(out) == sha256_of(target / "vol0.img")
    finally:
        api.call("POST", "/v1/volumes/vol0/mount")
    for name, digest in digests.items():
        assert sha256_of(d / name) == digest
    api.call("DELETE", f"/v1/snapshots/vol0/{second['snapshot']}")  # leave the lab as found
