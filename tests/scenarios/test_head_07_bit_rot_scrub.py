"""Scenario head-07: bit rot on one ISU's disk, found by `opie array scrub`.

Fails: bytes of one 4 KiB block on isu3's backing file are flipped behind
the array's back (the ISU keeps serving).
Must hold: `opie array scrub --json` checks every block, repairs the bad one
from parity, names isu3's export as the member it was on, reports nothing
unrecoverable, and the block on isu3's disk holds its old contents again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from opie.raid5.superblock import Superblock
from scenario_support import write_file

BLOCK = 4096


def test_bit_rot_found_and_repaired_by_scrub(head_lab):
    lab, api = head_lab
    d = lab.dir / "mnt" / "vol0" / "s07"
    d.mkdir()
    for i in range(4):
        write_file(d / f"r{i}", 1_500_000, seed=700 + i)
    os.sync()
    disk = lab.dir / "isu3" / "disk0.img"
    with open(disk, "r+b") as f:
        data_offset = Superblock.from_bytes(f.read(BLOCK)).geometry.data_offset
        at = data_offset
        while True:  # the first block of data (or parity) the volume put on isu3
            f.seek(at)
            good = f.read(BLOCK)
            assert len(good) == BLOCK, "no data on isu3"
            if any(good):
                break
            at += BLOCK
        f.seek(at)
        f.write(bytes(b ^ 0x5A for b in good))
        f.flush()
        os.fsync(f.fileno())

    res = subprocess.run([sys.executable, "-m", "opie.cli.main", "array", "scrub", "--json", "--lab", str(lab.dir)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    isu3 = lab.lab["isus"][3]["exports"][0]
    assert report["repaired"] >= 1 and report["unrecoverable"] == 0
    assert report["by_member"] == {isu3: report["repaired"]}
    assert report["checked"] > 0
    with open(disk, "rb") as f:
        f.seek(at)
        assert f.read(BLOCK) == good
    assert api.status()["array"]["state"] == "UUUUU"
