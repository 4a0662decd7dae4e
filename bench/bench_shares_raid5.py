#!/usr/bin/env python3
"""Issue 5's benchmark: smbclient put and get of 1 GiB to a share on the
RAID5 volume and to a share on a plain local directory, served by the same
smbd (bench_shares.py), median of >= 3 runs, ratio printed.

    python3 bench/bench_shares_raid5.py [--size-mib 1024] [--runs 3] [--drop-caches]

Starts a lab (5 ISUs of 768 MiB, head, vol0 on RAID5 over TLS) under
/var/tmp, points share A at a directory on vol0 and share B at a plain
directory on the same disk, and stops the lab afterwards."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_shares  # noqa: E402
from lab.runner import Lab  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="opie-bench-shares-", dir="/var/tmp"))
    base.chmod(0o755)
    lab = Lab(base / "lab", isus=5, disk_size="768M")
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
