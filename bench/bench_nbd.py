#!/usr/bin/env python3
"""Benchmark: one 1 GiB backing file served by our ISU and by nbdkit's file
plugin, side by side in the same run, moved both ways with nbdcopy.

    python3 bench/bench_nbd.py [--size 1G] [--runs 3] [--dir /var/tmp] [--flush]

Prints MB/s per server and direction (median of --runs) and our/nbdkit
ratio. The runs alternate which server goes first. Without --flush both
servers write into the page cache (the protocol path is measured); with
--flush nbdcopy flushes at the end, adding the disk's writeback to both.
Not a test: numbers on a shared 2-core VM are noisy, read the ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from opie.isu.disks import parse_size  # noqa: E402
from proc_support import random_file, start_isu, start_nbdkit, stop  # noqa: E402


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the backing files go (default: a temp dir)")
    ap.add_argument("--flush", action="store_true", help="nbdcopy --flush on writes")
    a = ap.parse_args()
    size = parse_size(a.size)
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="opie-bench-nbd-") as d:
        src, out = os.path.join(d, "src.img"), os.path.join(d, "out.img")
        random_file(src, size, seed=2026)
        for name in ("ours.img", "nbdkit.img"):
            with open(os.path.join(d, name), "wb") as f:
                f.truncate(size)
        isu = start_isu(os.path.join(d, "isu"), [os.path.join(d, "ours.img")])
        kit, kit_port = start_nbdkit(os.path.join(d, "nbdkit.img"))
        urls = {"opie": isu.url("ours"), "nbdkit": f"nbd://127.0.0.1:{kit_port}/"}
        times: dict[tuple[str, str], list[float]] = {}
        flush = ["--flush"] if a.flush else []
        try:
            for r in range(a.runs):
                order = ["opie", "nbdkit"] if r % 2 == 0 else ["nbdkit", "opie"]
                for server in order:
                    times.setdefault((server, "write"), []).append(timed(["nbdcopy", *flush, src, urls[server]]))
                    times.setdefault((server, "read"), []).append(timed(["nbdcopy", urls[server], out]))
                    os.unlink(out)
        finally:
            stop(isu.proc)
            stop(kit)
    mb = size / 1e6
    print(f"\nNBD server throughput, {a.size} via nbdcopy, median of {a.runs} runs"
          f"{' (writes flushed)' if a.flush else ''}")
    print(f"{'direction':<28}{'opie ISU MB/s':>15}{'nbdkit file MB/s':>18}{'opie/nbdkit':>13}")
    for direction, label in (("write", "write (nbdcopy file -> NBD)"), ("read", "read  (nbdcopy NBD -> file)")):
        ours = mb / statistics.median(times[("opie", direction)])
        kit = mb / statistics.median(times[("nbdkit", direction)])
        print(f"{label:<28}{ours:>15.0f}{kit:>18.0f}{ours / kit:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
