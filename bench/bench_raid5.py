"""RAID5 engine throughput: prints tables, never part of the test run.

Part 1: sequential full-stripe write and read of 1 GiB through the engine
over 5 in-memory members, beside numpy XOR of the same data (parity bound).
Part 2: the same through 5 ISU agents on loopback (`opie isu serve`, plain
NBD) beside one nbdkit export of the same size moved by nbdcopy.
Median of --runs runs (default 3); ratios are engine / baseline.

    python3 bench/bench_raid5.py [--size 1G] [--runs 3] [--skip-isu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from opie.raid5.assemble import create
from opie.raid5.geometry import Geometry
from opie.raid5.member import MemoryMember

MEMBERS = 5
CHUNK = 64 * 1024
IO = 8 << 20          # bytes per array write/read call (32 stripes: one run)
DEPTH = 8             # calls in flight
PPL = 4 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def member_size(data_bytes: int) -> int:
    stripes = -(-data_bytes // ((MEMBERS - 1) * CHUNK))
    g = Geometry(MEMBERS, CHUNK, stripes, PPL)
    return g.data_offset + stripes * CHUNK


async def sequential(arr, data: memoryview | None, size: int) -> float:
    """Write `data` (or read `size` bytes) sequentially, DEPTH calls in flight; seconds."""
    sem = asyncio.Semaphore(DEPTH)

    async def one(at: int) -> None:
        async with sem:
            if data is not None:
                await arr.write(at, data[at:at + IO])
            else:
                await arr.read(at, min(IO, size - at))

    t = time.perf_counter()
    await asyncio.gather(*(one(at) for at in range(0, size, IO)))
    if data is not None:
        await arr.flush()
    return time.perf_counter() - t


def xor_seconds(data: np.ndarray) -> float:
    """numpy XOR parity of the same data, stripe by stripe layout (4 data chunks -> 1)."""
    stripes = data.reshape(-1, MEMBERS - 1, CHUNK // 8)
    parity = np.empty((stripes.shape[0], CHUNK // 8), dtype=np.uint64)
    t = time.perf_counter()
    np.bitwise_xor(stripes[:, 0], stripes[:, 1], out=parity)
    for i in range(2, MEMBERS - 1):
        np.bitwise_xor(parity, stripes[:, i], out=parity)
    return time.perf_counter() - t


def table(title: str, rows: list[tuple[str, float, str, float]], size: int) -> None:
    print(f"\n{title}")
    print(f"{'operation':<28}{'engine MB/s':>14}{'baseline':>34}{'MB/s':>10}{'ratio':>8}")
    for op, secs, base_name, base_secs in rows:
        print(f"{op:<28}{size / secs / 1e6:>14.0f}{base_name:>34}{size / base_secs / 1e6:>10.0f}"
              f"{base_secs / secs:>8.2f}")


async def part_memory(size: int, runs: int, data: np.ndarray) -> None:
    view = memoryview(data.view(np.uint8))
    writes, reads, xors = [], [], []
    for _ in range(runs):
        members = [MemoryMember(member_size(size), f"mem{i}") for i in range(MEMBERS)]
        arr = await create(members, chunk_size=CHUNK, ppl_size=PPL, assume_clean=True)
        writes.append(await sequential(arr, view, size))
        reads.append(await sequential(arr, None, size))
        if runs and len(reads) == 1:
            got = await arr.read(0, 1 << 20)
            assert got == bytes(view[:1 << 20]), "read back differs"
        xors.append(xor_seconds(data))
        del arr, members
    x = statistics.median(xors)
    table(f"RAID5 engine, {MEMBERS} in-memory members, chunk {CHUNK // 1024} KiB, "
          f"{size >> 20} MiB, median of {runs}",
          [("full-stripe write", statistics.median(writes), "numpy XOR parity", x),
           ("sequential read", statistics.median(reads), "numpy XOR parity", x)], size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_isu(workdir: str, index: int, size: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    disk = os.path.join(workdir, f"isu{index}", f"disk{index}.img")
    os.makedirs(os.path.dirname(disk), exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "opie.cli.main", "isu", "serve", "--disk", f"{disk}:{size}",
         "--listen", f"127.0.0.1:{port}", "--state-dir", os.path.join(workdir, f"isu{index}", "state")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if '"ready"' not in line:
        proc.kill()
        raise RuntimeError(f"isu{index} did not start: {line!r}")
    json.loads(line)
    return proc, port


def start_nbdkit(workdir: str, size: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    path = os.path.join(workdir, "nbdkit.img")
    with open(path, "wb") as f:
        f.truncate(size)
    proc = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


def nbdcopy_seconds(src: str, dst: str) -> float:
    t = time.perf_counter()
    subprocess.run(["nbdcopy", "--flush", src, dst] if not dst.startswith("null") else
                   ["nbdcopy", src, dst], check=True)
    return time.perf_counter() - t


async def part_isu(size: int, runs: int, data: np.ndarray) -> None:
    from opie.nbd.client import NBDClient  # only the benchmark composes raid5 with nbd

    view = memoryview(data.view(np.uint8))
    workdir = tempfile.mkdtemp(prefix="bench-raid5-")
    procs: list[subprocess.Popen] = []
    try:
        src = os.path.join(workdir, "source.img")
        with open(src, "wb") as f:
            f.write(view)
        writes, reads, kit_w, kit_r = [], [], [], []
        for run in range(runs):
            msize = member_size(size)
            ports = []
            for i in range(MEMBERS):
                proc, port = start_isu(os.path.join(workdir, f"run{run}"), i, msize)
                procs.append(proc)
                ports.append(port)
            clients = [await NBDClient.connect("127.0.0.1", p, f"disk{i}")
                       for i, p in enumerate(ports)]
            for i, c in enumerate(clients):
                c.name = f"isu{i}"
            arr = await create(clients, chunk_size=CHUNK, ppl_size=PPL, assume_clean=True)
            writes.append(await sequential(arr, view, size))
            reads.append(await sequential(arr, None, size))
            if run == 0:
                assert await arr.read(0, 1 << 20) == bytes(view[:1 << 20]), "read back differs"
            for c in clients:
                await c.close()
            kit, port = start_nbdkit(workdir, size)
            procs.append(kit)
            url = f"nbd://127.0.0.1:{port}"
            kit_w.append(nbdcopy_seconds(src, url))
            kit_r.append(nbdcopy_seconds(url, "null:"))
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
            procs.clear()
            shutil.rmtree(os.path.join(workdir, f"run{run}"), ignore_errors=True)
            os.unlink(os.path.join(workdir, "nbdkit.img"))
        table(f"RAID5 engine over {MEMBERS} ISUs on loopback (plain NBD) vs one nbdkit file "
              f"export moved by nbdcopy, {size >> 20} MiB, median of {runs}",
              [("full-stripe write", statistics.median(writes), "nbdcopy file -> nbdkit",
                statistics.median(kit_w)),
               ("sequential read", statistics.median(reads), "nbdcopy nbdkit -> null:",
                statistics.median(kit_r))], size)
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-isu", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    stripe = (MEMBERS - 1) * CHUNK
    size -= size % stripe
    data = np.frombuffer(np.random.default_rng(1).bytes(size), dtype=np.uint64)
    if not args.skip_memory:
        asyncio.run(part_memory(size, args.runs, data))
    if not args.skip_isu:
        try:
            import opie.nbd.client  # noqa: F401
        except ImportError:
            print("\n(ISU part skipped: nbd.client is not available)")
            return 0
        asyncio.run(part_isu(size, args.runs, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
