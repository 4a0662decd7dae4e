#!/usr/bin/env python3
"""Issue 5's benchmark: smbclient put and get of 1 GiB to a share on the
RAID5 volume and to a share on a plain local directory, served by the same
smbd (bench_shares.py), median of >= 3 runs, ratio printed.

    python3 bench/bench_shares_raid5.py [--size-mib 1024] [--runs 3] [--drop-caches]

Starts the default lab (5 ISUs of 2 GiB, head, vol0 of about 4.8 GiB on
RAID5 over TLS) under /var/tmp, points share A at a directory on vol0 and
share B at a plain directory on the same disk, and stops the lab afterwards.

The volume must be large next to the file, as the root filesystem is: when
ext4's free space falls below twice its dirty data it starts write-back from
inside write(), and below 1.5 times it stops delaying allocation
(ext4_nonda_switch). So a 1 GiB put into a 1.8 GiB volume (768 MiB disks)
measured our write-back path at about 150 MB/s rather than smbd's;
bench_fs.py measures that path."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_shares  # noqa: E402
from opie.lab.runner import Lab  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="opie-bench-shares-", dir="/var/tmp"))
    base.chmod(0o755)
    lab = Lab(base / "lab", isus=5)  # the default lab: 2 GiB disks
    try:
        info = lab.up()
        plain = base / "plain"
        plain.mkdir()
        argv = ["--root-a", info["volumes"][0]["mountpoint"], "--label-a", "raid5",
                "--root-b", str(plain), "--label-b", "plain",
                "--size-mib", str(a.size_mib), "--runs", str(a.runs), "--tmp", str(base)]
        if a.drop_caches:
            argv.append("--drop-caches")
        return bench_shares.main(argv)
    finally:
        lab.down()
        lab.remove_user()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
