"""Volume write throughput with 0, 1, 10 and 100 snapshots held.

For each snapshot count N, a fresh pool on an in-memory device gets a
256 MiB volume, filled once. Then 100 rounds each overwrite 1 MiB at random
places; after each of the last N rounds a snapshot is taken, so the
snapshots really differ and hold their own versions. The timed part writes
256 MiB more in random 64 KiB-1 MiB writes at random 4 KiB-aligned offsets,
then flushes: with N >= 1 every segment's first write places a new version
of it (the newest snapshot shares them all), with N = 0 every write goes in
place. Median of --runs runs, after one discarded warm-up run (the process's
first run pays the allocator's page faults); ratios to 0 snapshots, and to 1
snapshot (does the cost grow with the number of snapshots?).

    python3 bench/bench_snapshots.py [--runs 5] [--segment-size 262144]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from opie.head.volumes import DEFAULT_SEGMENT, MemoryDevice, Pool

MIB = 1 << 20
VOLUME = 256 * MIB
ROUNDS = 100
ROUND_BYTES = MIB


def random_writes(rng: random.Random, total: int) -> list[tuple[int, int]]:
    out = []
    done = 0
    while done < total:
        n = min(rng.randrange(64 * 1024, MIB + 1, 4096), total - done)
        out.append((rng.randrange(0, VOLUME - n + 1, 4096), n))
        done += n
    return out


def touched_memory_device(size: int) -> MemoryDevice:
    """A MemoryDevice whose pages are already mapped: otherwise the first
    write to a fresh segment pays a page fault, which a disk does not."""
    dev = MemoryDevice(size)
    dev.buf[::4096] = b"\1" * len(range(0, size, 4096))
    dev.buf[::4096] = bytes(len(range(0, size, 4096)))
    return dev


async def one_run(snapshots: int, segment_size: int, seed: int) -> tuple[float, float]:
    """(MiB/s by wall clock, MiB/s by this process's CPU time) of the timed part."""
    rng = random.Random(seed)
    payload = rng.randbytes(MIB)
    cow_space = ROUNDS * (ROUND_BYTES + 2 * MIB) + VOLUME
    pool = await Pool.format(touched_memory_device(VOLUME + cow_space + 64 * MIB),
                             segment_size=segment_size)
    await pool.create_volume("bench", VOLUME)
    vol = pool.open_volume("bench")
    for off in range(0, VOLUME, MIB):
        await vol.write(off, payload)
    await vol.flush()
    for i in range(ROUNDS):
        for off, n in random_writes(rng, ROUND_BYTES):
            await vol.write(off, payload[:n])
        if i >= ROUNDS - snapshots:
            await pool.create_snapshot("bench", f"s{i}")
    await vol.flush()
    writes = random_writes(rng, VOLUME)
    start, cpu = time.perf_counter(), time.process_time()
    for off, n in writes:
        await vol.write(off, payload[:n])
    await vol.flush()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    report = pool.check()
    if not report.ok:
        raise SystemExit(f"check failed: {report.problems[:3]}")
    return VOLUME / MIB / elapsed, VOLUME / MIB / cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--segment-size", type=int, default=DEFAULT_SEGMENT)
    args = parser.parse_args()
    print(f"volume 256 MiB, segment {args.segment_size // 1024} KiB, in-memory device, "
          f"256 MiB of 64 KiB-1 MiB random writes + flush, median of {args.runs}")
    print("(the device is memory, so this is CPU-bound: the CPU-time rate is what other "
          "load on the machine cannot disturb)")
    print(f"{'snapshots':>9}  {'MiB/s wall':>10}  {'ratio':>6}  {'MiB/s cpu':>10}  {'ratio':>6}  "
          f"{'cpu vs 1 snap':>13}  wall runs")
    counts = (0, 1, 10, 100)
    results: dict[int, list[tuple[float, float]]] = {c: [] for c in counts}
    await one_run(counts[-1], args.segment_size, args.runs)   # warm-up, not counted
    for seed in range(args.runs):          # interleaved, so load changes hit all alike
        for count in counts:
            results[count].append(await one_run(count, args.segment_size, seed))
    base_wall = statistics.median(r[0] for r in results[0])
    base_cpu = statistics.median(r[1] for r in results[0])
    one_cpu = statistics.median(r[1] for r in results[1])
    for count in counts:
        wall = statistics.median(r[0] for r in results[count])
        cpu = statistics.median(r[1] for r in results[count])
        shown = " ".join(f"{r[0]:.0f}" for r in results[count])
        vs_one = f"{cpu / one_cpu:.2f}" if count else "-"
        print(f"{count:>9}  {wall:>10.0f}  {wall / base_wall:>6.2f}  {cpu:>10.0f}  "
              f"{cpu / base_cpu:>6.2f}  {vs_one:>13}  {shown}")


if __name__ == "__main__":
    asyncio.run(main())
