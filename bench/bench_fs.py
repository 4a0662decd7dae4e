#!/usr/bin/env python3
"""Benchmark (issue 4 a): a sequential write (fsync'd) and a cold read of one
file through a mounted filesystem, on three stacks side by side in one run:

    opie      ext4 on Opie's RAID5 over 5 ISUs (`lab.runner.Lab`, in-process:
              ISU agents + head; the head mounts vol0 via its NBD export ->
              nbdfuse -> loop --direct-io=on -> ext4)
    zfs-fuse  a raidz1 pool over 5 backing files of the ISU disk size
              (our own zfs-fuse daemon, started with --no-daemon)
    loop      ext4 on a plain file via `losetup --direct-io=on` (the baseline:
              ratios are to this one)

    python3 bench/bench_fs.py [--size 1G] [--runs 3] [--dir DIR] [--profile DIR]

Every run builds each stack fresh (a new lab / pool / file system), writes
the file with `dd bs=4M conv=fsync` from a random source held in /dev/shm
(the timed part ends when the fsync returns), then makes the read cold:
`sync; echo 3 > /proc/sys/vm/drop_caches`, and for zfs-fuse also
`zpool export` + `zpool import`, because its ARC lives in the daemon's own
memory, which drop_caches does not touch. The read is `dd bs=4M` to
/dev/null; afterwards (untimed) the file is compared with the source. The
order of the stacks rotates between runs. MB/s are 10^6 bytes per second,
median of --runs runs.

Durability is honest on all three: dd's fsync on ext4 sends a FLUSH down the
loop device (to nbdfuse -> the head -> the ISUs, or to the plain file);
zfs-fuse's fsync commits the ZIL and fsyncs its vdev files (seen with
strace: fsync calls on the backing files; this zfs-fuse has no `sync`
property to turn that off).

Each Opie run also prints the CPU seconds the head, the 5 ISUs together and
nbdfuse used during the write and during the read (from /proc/PID/stat).

--profile DIR runs one extra Opie pass, not counted in the medians, with
`py-spy record --idle` (pip install py-spy) attached to the head and to ISU 0
during the write and during the read, and prints per thread how busy it was
(samples not parked in select or a queue wait; a thread waiting for the GIL
or for a CPU counts as busy) and the frames that dominate the busy samples,
by own time and including callees. Raw collapsed stacks stay in DIR.

Not a test: the machine is a shared 2-core VM, read the ratios.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, REPO)
# the lab starts `python -m cli.main`: make it importable whatever our cwd is
os.environ["PYTHONPATH"] = REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

from opie.isu.disks import parse_size  # noqa: E402
sys.path.insert(0, os.path.join(REPO, "tests"))
from proc_support import random_file  # noqa: E402

MIB = 1 << 20
ISUS = 5
POOL = "opiebenchfs"
FILE = "bench.bin"
STACKS = ("opie", "zfs-fuse", "loop")
LABELS = {"opie": "opie: ext4 / RAID5 over 5 ISUs",
          "zfs-fuse": "zfs-fuse raidz1 over 5 files",
          "loop": "ext4 on a plain loop file"}


def run(args: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {res.returncode}: {res.stderr.strip()[-800:]}")
    return res


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed_dd(src: str, dst: str, fsync: bool) -> float:
    args = ["dd", f"if={src}", f"of={dst}", "bs=4M"] + (["conv=fsync"] if fsync else [])
    t = time.perf_counter()
    run(args, timeout=1800)
    return time.perf_counter() - t


def same_file(a: str, b: str) -> bool:
    return run(["cmp", "--silent", a, b], check=False, timeout=1800).returncode == 0


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_note(before: dict[str, float], after: dict[str, float], wall: float) -> str:
    return ", ".join(f"{role} {after[role] - before[role]:.1f}" for role in after) + f" (wall {wall:.1f})"


def disk_size_for(size: int) -> int:
    """ISU disk size (MiB-aligned): the lab makes vol0 0.6 * (isus - 1) * disk;
    leave 25 % headroom over the file for ext4. At least 768 MiB."""
    need = int(size * 1.25 / (0.6 * (ISUS - 1)))
    return max(768 * MIB, -(-need // MIB) * MIB)


# --------------------------------------------------------------------------- stacks
class OpieStack:
    def __init__(self, work: Path, disk: int):
        self.work, self.disk, self.lab, self.info = work, disk, None, None

    def up(self) -> str:
        from opie.lab.runner import Lab  # noqa: PLC0415
        self.lab = Lab(self.work, isus=ISUS, disk_size=f"{self.disk // MIB}M")
        self.info = self.lab.up()
        return self.info["volumes"][0]["mountpoint"]

    def cold(self) -> None:
        pass

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the head, the ISUs (summed) and nbdfuse."""
        pids = {"head": [h["pid"] for h in self.info["heads"]], "ISUs": [i["pid"] for i in self.info["isus"]],
                "nbdfuse": []}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if argv and os.path.basename(argv[0]) == b"nbdfuse" and str(self.work).encode() in b" ".join(argv):
                    pids["nbdfuse"].append(int(d))
        return {role: sum(cpu_seconds(p) for p in group) for role, group in pids.items()}

    def down(self) -> None:
        if self.lab is not None:
            self.lab.down()  # the head unmounts ext4, detaches loop, stops nbdfuse; then the ISUs
            self.lab.remove_user()
            self.lab = None
        mnt = self.work / "mnt"
        leftover = [ln for ln in Path("/proc/self/mounts").read_text().splitlines() if str(mnt) in ln]
        if leftover:
            raise RuntimeError(f"opie lab left mounts behind: {leftover}")


class ZfsStack:
    def __init__(self, work: Path, disk: int):
        self.work, self.disk = work, disk
        self.files = [str(work / "vdev" / f"f{i}.img") for i in range(ISUS)]
        self.mnt = str(work / "mnt")
        self.proc: subprocess.Popen | None = None
        self.created = False

    def _zpool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["zpool", *args], check=check, timeout=300)

    def up(self) -> str:
        others = run(["pgrep", "-x", "zfs-fuse"], check=False).stdout.split()
        if others:
            raise RuntimeError(f"a zfs-fuse daemon already runs (pid {', '.join(others)}); "
                               "zfs-fuse allows one per host: stop it or wait")
        os.makedirs(self.work / "vdev", exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        for f in self.files:
            with open(f, "wb") as fh:
                fh.truncate(self.disk)
        log = open(self.work / "zfs-fuse.log", "ab")
        try:
            self.proc = subprocess.Popen(["zfs-fuse", "--no-daemon", "--no-kstat-mount",
                                          "--pidfile", str(self.work / "zfs-fuse.pid")],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + 20
        while self._zpool("list", check=False).returncode != 0:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zfs-fuse exited with {self.proc.returncode}; see {self.work}/zfs-fuse.log")
            if time.monotonic() > deadline:
                raise RuntimeError("zfs-fuse did not answer `zpool list` in 20 s")
            time.sleep(0.2)
        if POOL in self._zpool("list", "-H", "-o", "name").stdout.split():
            # left by an older run that recorded it in zpool.cache; ours never do (cachefile=none)
            self._zpool("destroy", "-f", POOL, check=False)
        self._zpool("create", "-f", "-o", "cachefile=none", "-m", self.mnt, POOL, "raidz1", *self.files)
        self.created = True
        return self.mnt

    def cold(self) -> None:
        # the ARC is in zfs-fuse's memory: drop_caches cannot empty it, an export does
        self._zpool("export", POOL)
        self._zpool("import", "-o", "cachefile=none", "-d", str(self.work / "vdev"), POOL)

    def down(self) -> None:
        try:
            if self.created and self.proc is not None and self.proc.poll() is None:
                # "pool is busy": FUSE releases the last file asynchronously, and a process
                # that another session starts with `ip netns exec` meanwhile copies our mount
                # table (DESIGN.md) and pins the mount. Retry, then detach it lazily here.
                for attempt in range(12):
                    if attempt == 8 and os.path.ismount(self.mnt):
                        run(["umount", "-l", self.mnt], check=False)
                    r = self._zpool("destroy", "-f", POOL, check=False)
                    if r.returncode == 0:
                        break
                    time.sleep(0.5)
                else:
                    print(f"warning: zpool destroy {POOL}: {r.stderr.strip()} (the pool is not in "
                          "zpool.cache: stopping the daemon forgets it)", file=sys.stderr)
                self.created = False
        finally:
            if self.proc is not None:
                if self.proc.poll() is None:
                    self.proc.terminate()
                    try:
                        self.proc.wait(60)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(10)
                self.proc = None
            if os.path.ismount(self.mnt):  # a daemon that died leaves a dead FUSE mount
                run(["umount", "-l", self.mnt], check=False)


class LoopStack:
    def __init__(self, work: Path, size: int):
        self.work, self.size = work, size
        self.file, self.mnt = str(work / "plain.img"), str(work / "mnt")
        self.device: str | None = None
        self.mounted = False

    def up(self) -> str:
        os.makedirs(self.mnt, exist_ok=True)
        with open(self.file, "wb") as f:
            f.truncate(self.size)
        self.device = run(["losetup", "--find", "--show", "--direct-io=on", self.file]).stdout.strip()
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", self.device])
        run(["mount", "-t", "ext4", self.device, self.mnt])
        self.mounted = True
        return self.mnt

    def cold(self) -> None:
        pass

    def down(self) -> None:
        try:
            if self.mounted:
                for _ in range(20):
                    if run(["umount", self.mnt], check=False).returncode == 0:
                        break
                    time.sleep(0.5)
                else:
                    run(["umount", "-l", self.mnt], check=False)
                self.mounted = False
        finally:
            if self.device:
                run(["losetup", "-d", self.device], check=False)
                self.device = None


def make_stack(name: str, work: Path, disk: int, volume: int):
    if name == "opie":
        return OpieStack(work, disk)
    if name == "zfs-fuse":
        return ZfsStack(work, disk)
    return LoopStack(work, volume)


def measure(name: str, work: Path, src: str, size: int, disk: int, volume: int,
            during=None) -> tuple[float, float, str]:
    """Fresh stack, timed write + cold read, teardown. (write s, read s, a note
    on where the CPU went, for stacks that can tell)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stack = make_stack(name, work, disk, volume)
    try:
        mnt = stack.up()
        path = os.path.join(mnt, FILE)
        drop_caches()
        cpu = getattr(stack, "cpu", None)
        notes = []
        ctx = during(stack, "write") if during else None
        c0 = cpu() if cpu else None
        try:
            w = timed_dd(src, path, fsync=True)
        finally:
            if ctx:
                ctx()
        if cpu:
            notes.append("CPU s in write: " + cpu_note(c0, cpu(), w))
        stack.cold()
        drop_caches()
        ctx = during(stack, "read") if during else None
        c0 = cpu() if cpu else None
        try:
            r = timed_dd(path, "/dev/null", fsync=False)
        finally:
            if ctx:
                ctx()
        if cpu:
            notes.append("in read: " + cpu_note(c0, cpu(), r))
        if os.path.getsize(path) != size or not same_file(src, path):
            raise RuntimeError(f"{name}: the file read back differs from the source")
        return w, r, "; ".join(notes)
    finally:
        stack.down()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- profiling
def profile_opie(out: Path, src: str, size: int, disk: int, volume: int, work: Path, rate: int) -> None:
    if shutil.which("py-spy") is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)

    def during(stack: OpieStack, phase: str):
        targets = {"head": stack.info["heads"][0]["pid"], "isu0": stack.info["isus"][0]["pid"]}
        procs = []
        for who, pid in targets.items():
            f = out / f"{who}-{phase}.txt"
            procs.append((f, subprocess.Popen(
                ["py-spy", "record", "--nonblocking", "--idle", "--threads", "--format", "raw", "--rate", str(rate),
                 "--pid", str(pid), "--output", str(f)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)))
        time.sleep(1.0)  # let py-spy attach before the timed I/O starts

        def stop():
            for _, p in procs:
                p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            for _, p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        return stop

    w, r, _ = measure("opie", work, src, size, disk, volume, during=during)
    mb = size / 1e6
    print(f"\nprofiled Opie pass (py-spy --nonblocking --idle, {rate} Hz; not in the medians): "
          f"write {mb / w:.0f} MB/s, read {mb / r:.0f} MB/s; raw stacks in {out}")
    for phase in ("write", "read"):
        for who in ("head", "isu0"):
            summarize(out / f"{who}-{phase}.txt", f"{who} during {phase}")


def _frame(f: str) -> str:
    # py-spy raw frames look like "func (path/to/file.py:123)"; shorten the path
    if " (" in f and f.endswith(")"):
        func, loc = f[:-1].split(" (", 1)
        loc = loc.replace(REPO + "/", "")
        for marker in ("/lib/python3", "/site-packages/"):
            if marker in loc:
                loc = loc.split("/")[-1]
        return f"{func} ({loc})"
    return f


IDLE_LEAVES = ("EpollSelector.select", "_PollLikeSelector.select", "PollSelector.select", "select",
               "_worker (concurrent/futures/thread.py:81)", "Condition.wait", "Event.wait")


def summarize(path: Path, title: str, top: int = 10) -> None:
    """Per thread: how busy it was (samples not parked in select/a queue wait;
    a runnable thread waiting for a CPU counts as parked too), then the
    busiest frames over all threads, by own time and including callees."""
    if not path.exists():
        print(f"\n{title}: no profile ({path} missing)")
        return
    per_thread: collections.Counter = collections.Counter()
    busy_thread: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        parts = stack.split(";")
        thread = parts[0].split(": ", 1)[-1] if parts[0].startswith("thread (") else "?"
        frames = [_frame(f) for f in parts[1:] if f]
        per_thread[thread] += n
        if not frames or frames[-1].startswith(IDLE_LEAVES):
            continue
        busy += n
        busy_thread[thread] += n
        own[frames[-1]] += n
        for f in set(frames):
            if "threading.py" not in f and "runpy" not in f:
                incl[f] += n
    print(f"\n{title}: " + ", ".join(f"thread {t} {100 * busy_thread[t] / c:.0f}% busy"
                                     for t, c in per_thread.most_common()))
    if not busy:
        return
    print(f"  busy samples ({busy}), own time:")
    for f, n in own.most_common(top):
        print(f"    {100 * n / busy:5.1f}%  {f}")
    print("  busy samples, including callees (Opie frames):")
    ours = [(f, n) for f, n in incl.most_common() if f.split(" (")[-1].startswith(("nbd/", "raid5/", "head/", "isu/"))]
    for f, n in ours[:top]:
        print(f"    {100 * n / busy:5.1f}%  {f}")


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="file size (default 1G)")
    ap.add_argument("--runs", type=int, default=3, help="runs per stack, median reported (default 3)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir under /var/tmp)")
    ap.add_argument("--stacks", default=",".join(STACKS), help=f"subset of {','.join(STACKS)}")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after the runs, one py-spy profiled Opie pass; stacks saved in DIR")
    ap.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second (default 50)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (mounts, loop devices, drop_caches)")
    stacks = [s for s in a.stacks.split(",") if s]
    if not stacks or any(s not in STACKS for s in stacks) or a.runs < 1:
        raise SystemExit(f"--stacks must be a subset of {','.join(STACKS)}; --runs >= 1")
    size = parse_size(a.size)
    disk = disk_size_for(size)
    volume = (int((ISUS - 1) * disk * 0.6) // MIB) * MIB  # what the lab gives vol0; the plain file gets the same

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    base = Path(tempfile.mkdtemp(prefix="opie-bench-fs-", dir=a.dir or "/var/tmp")).resolve()
    os.chmod(base, 0o755)  # the lab wants its directory traversable (share users reach the volume)
    src_fd, src = tempfile.mkstemp(prefix="opie-bench-fs-src-", dir="/dev/shm")
    os.close(src_fd)
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in stacks}
    mb = size / 1e6
    try:
        random_file(src, size, seed=2026)
        print(f"{a.size} file, ISU / zfs vdev size {disk // MIB} MiB, opie vol0 and plain file {volume // MIB} MiB, "
              f"work dir {base}", flush=True)
        for r in range(a.runs):
            order = stacks[r % len(stacks):] + stacks[:r % len(stacks)]
            for name in order:
                w, rd, note = measure(name, base / name, src, size, disk, volume)
                times[name].append((w, rd))
                print(f"run {r + 1}  {name:<9} write {mb / w:7.1f} MB/s ({w:6.2f} s)   "
                      f"read {mb / rd:7.1f} MB/s ({rd:6.2f} s)", flush=True)
                if note:
                    print(f"       {note}", flush=True)
        if a.profile:
            profile_opie(Path(a.profile).resolve(), src, size, disk, volume, base / "opie-profiled",
                         a.profile_rate)
    finally:
        os.unlink(src)
        shutil.rmtree(base, ignore_errors=True)

    med = {s: (statistics.median(mb / w for w, _ in times[s]), statistics.median(mb / r for _, r in times[s]))
           for s in stacks}
    base_w, base_r = med.get("loop", (None, None))
    print(f"\nFile system throughput, {a.size} sequential write (dd bs=4M conv=fsync) and cold read "
          f"(dd bs=4M after drop_caches), median of {a.runs} runs")
    print(f"{'stack':<34}{'write MB/s':>11}{'read MB/s':>11}{'write/loop':>12}{'read/loop':>11}")
    for s in stacks:
        w, r = med[s]
        wr = f"{w / base_w:.2f}" if base_w else "-"
        rr = f"{r / base_r:.2f}" if base_r else "-"
        print(f"{LABELS[s]:<34}{w:>11.1f}{r:>11.1f}{wr:>12}{rr:>11}")
    if "opie" in med and "zfs-fuse" in med:
        (ow, orr), (zw, zr) = med["opie"], med["zfs-fuse"]
        behind = [what for what, o, z in (("write", ow, zw), ("read", orr, zr)) if o <= z]
        verdict = "MET" if not behind else f"NOT MET ({' and '.join(behind)} behind)"
        print(f"aim (issue 4): opie ahead of zfs-fuse in write and read -- {verdict} in this run; "
              f"opie/zfs-fuse: write {ow / zw:.2f}x, read {orr / zr:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
