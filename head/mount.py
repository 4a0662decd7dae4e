"""An NBD export as a mounted ext4 filesystem: nbdfuse -> loop -> ext4.

The layers, bottom to top, each a real unmodified component (DESIGN.md,
"One write, top to bottom"):

    nbdfuse RUNTIME/NAME/fuse/disk URI     the export as one file in a FUSE mount
    losetup --direct-io=on FILE            /dev/loopN over that file, no page cache
    mkfs.ext4 (first use only)             only when the device holds no signature
    mount DEV MOUNTPOINT                   under an rshared bind mount root

Durability contract (measured, see tests/test_mount_flush_freeze.py): when
`fsync(2)` on a file in the mounted filesystem returns, every WRITE carrying
that file's blocks has been acknowledged by the NBD server and followed by an
acknowledged NBD FLUSH, and so has the journal commit that makes them
reachable. The same holds for the files' data after `sync`/`syncfs`; those two
then still write back in-place copies of already journaled metadata without a
trailing FLUSH (harmless: the flushed journal replays them). After
`fsfreeze -f` no WRITE follows the last FLUSH, so a snapshot taken while
frozen is a clean filesystem. The path: ext4 issues a REQ_PREFLUSH/FUA
journal commit; the loop device (write cache on, no FUA) turns each into
`vfs_fsync` on the backing FUSE file; FUSE sends FSYNC to nbdfuse, which calls
`nbd_flush`. This needs ext4's default barriers: `nobarrier` is refused.

Mount propagation: `ip netns exec` gives a process a copy of the mount table.
Mounts made under a bind mount that is `--make-rshared` propagate their later
umount into those copies, so the loop device and FUSE file become free again.
Both the FUSE directory (under `runtime_dir`) and the filesystem (under
`bind_root`) live under such roots; `ensure_shared_root` creates them.

Teardown (`down`) runs in reverse order and always completes: every step is
tried even when an earlier one failed; it is idempotent and safe on a
half-built mount, and on one whose NBD server or nbdfuse died. A `Mount` is
used by one thread at a time (its methods hold a lock).
"""
from __future__ import annotations

import enum
import errno
import hashlib
import logging
import os
import re
import signal
import struct
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opie.head import fsfreeze
from opie.shares.process import cmdline, pid_alive

log = logging.getLogger(__name__)

FUSE_FILE = "disk"
EXT4_MAGIC = 0xEF53
EXT4_MAGIC_OFFSET = 1080          # superblock at 1024, s_magic at +56, little-endian u16
DEFAULT_MKFS_ARGS = ("-q", "-b", "4096")
CMD_TIMEOUT = 60.0


class MountError(OSError):
    """A step of bringing a mount up or down failed; carries an errno and says which step."""


class State(enum.Enum):
    ABSENT = "absent"                  # nothing of ours exists
    FUSE_UP = "fuse_up"                # nbdfuse runs, the export is a file
    LOOP_ATTACHED = "loop_attached"    # /dev/loopN over that file
    MOUNTED = "mounted"                # ext4 mounted at the mountpoint
    FROZEN = "frozen"                  # mounted, fsfreeze -f in effect
    FAILED = "failed"                  # a step failed; down() clears it


# Allowed transitions; anything may fail, and down() returns everything to ABSENT.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.ABSENT: frozenset({State.FUSE_UP}),
    State.FUSE_UP: frozenset({State.LOOP_ATTACHED, State.ABSENT}),
    State.LOOP_ATTACHED: frozenset({State.MOUNTED, State.FUSE_UP}),
    State.MOUNTED: frozenset({State.FROZEN, State.LOOP_ATTACHED}),
    State.FROZEN: frozenset({State.MOUNTED}),
    State.FAILED: frozenset({State.ABSENT}),
}


# --- small system helpers ---------------------------------------------------

def _run(args: list[str], timeout: float = CMD_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise MountError(errno.ETIMEDOUT, f"{' '.join(args)}: no answer in {timeout}s") from e
    if check and res.returncode != 0:
        raise MountError(errno.EIO, f"{' '.join(args)}: {res.stderr.strip() or f'exit {res.returncode}'}")
    return res


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""
    mountpoint: str
    fstype: str
    source: str
    options: str
    shared: bool


def mounts() -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            a, b = pre.split(), post.split()
            out.append(MountEntry(_unescape(a[4]), b[0], _unescape(b[1]), a[5],
                                  any(x.startswith("shared:") for x in a[6:])))
    return out


def _mounted_at(path: str) -> MountEntry | None:
    path = os.path.abspath(path)
    found = None
    for m in mounts():
        if m.mountpoint == path:
            found = m               # the last one is the top of the stack
    return found


def _under(path: str, root: str) -> bool:
    root = os.path.abspath(root).rstrip("/") + "/"
    return os.path.abspath(path).rstrip("/") + "/" == root or os.path.abspath(path).startswith(root)


def loop_devices() -> dict[str, str]:
    """Attached loop devices: {"/dev/loopN": backing file} from sysfs (works on dead FUSE files)."""
    out = {}
    for name in os.listdir("/sys/block"):
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                back = f.read().strip()
        except OSError:
            continue
        out[f"/dev/{name}"] = back.removesuffix(" (deleted)")
    return out


def ensure_shared_root(path: str) -> None:
    """Make `path` a bind mount of itself with rshared propagation (idempotent)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    m = _mounted_at(path)
    if m is not None and m.shared:
        return
    if m is None:
        _run(["mount", "--bind", path, path])
    _run(["mount", "--make-rshared", path])
    log.info("%s: rshared bind mount root", path)


def release_shared_root(path: str) -> bool:
    """Unmount the bind mount root at `path` if nothing is mounted below it.
    Returns whether `path` is free of our bind mount afterwards."""
    path = os.path.abspath(path)
    if _mounted_at(path) is None:
        return True
    if any(_under(m.mountpoint, path) and m.mountpoint != path for m in mounts()):
        log.warning("%s: still has mounts below it; keeping the bind root", path)
        return False
    _umount(path, lazy_ok=True)
    return _mounted_at(path) is None


def has_filesystem(device: str) -> str | None:
    """The filesystem type on `device` (any blkid signature), or None if it holds none.
    Reads the ext4 superblock magic too, so an ext4 that blkid misjudges still counts."""
    res = _run(["blkid", "-p", "-o", "export", device], check=False)
    if res.returncode == 0:
        kv = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        return kv.get("TYPE") or kv.get("PTTYPE") or "unknown"
    if res.returncode != 2:           # 2: nothing found
        raise MountError(errno.EIO, f"{device}: blkid -p: {res.stderr.strip() or f'exit {res.returncode}'}")
    with open(device, "rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        raw = f.read(2)
    if len(raw) == 2 and struct.unpack("<H", raw)[0] == EXT4_MAGIC:
        return "ext4"
    return None


def _umount(path: str, *, retries: int = 5, lazy_ok: bool = True) -> None:
    """umount `path`, retrying while busy; lazy umount as a last resort (logged)."""
    last = ""
    for attempt in range(retries):
        if _mounted_at(path) is None:
            return
        res = _run(["umount", path], check=False)
        if res.returncode == 0:
            return
        last = res.stderr.strip()
        if "not mounted" in last:
            return
        time.sleep(0.1 * (attempt + 1))
    if _mounted_at(path) is None:
        return
    if not lazy_ok:
        raise MountError(errno.EBUSY, f"{path}: umount: {last}")
    log.warning("%s: umount failed (%s); lazy umount", path, last)
    _run(["umount", "-l", path], check=False)
    if _mounted_at(path) is not None:
        raise MountError(errno.EBUSY, f"{path}: still mounted after lazy umount")


def _detach_loop(device: str) -> None:
    """losetup -d; a device still in use is left with autoclear (detaches when released)."""
    res = _run(["losetup", "-d", device], check=False)
    if res.returncode != 0 and device in loop_devices():
        raise MountError(errno.EBUSY, f"{device}: losetup -d: {res.stderr.strip()}")


def _is_nbdfuse(pid: int) -> bool:
    argv = cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]) == "nbdfuse"


def _stop_fuse(fuse_dir: str, pid: int | None, proc: subprocess.Popen | None, timeout: float,
               kill: bool = True) -> None:
    """fusermount3 -u (lazily when busy), then wait for nbdfuse to exit. With `kill`
    (nothing uses the FUSE file any more) SIGTERM, then SIGKILL it by pid if it lingers;
    without, a lazily unmounted nbdfuse keeps serving its last users and exits after them."""
    if _mounted_at(fuse_dir) is not None:
        res = _run(["fusermount3", "-u", fuse_dir], check=False, timeout=timeout)
        if res.returncode != 0 and _mounted_at(fuse_dir) is not None:
            log.warning("%s: fusermount3 -u failed (%s); lazy unmount", fuse_dir, res.stderr.strip())
            _run(["fusermount3", "-u", "-z", fuse_dir], check=False, timeout=timeout)
            if _mounted_at(fuse_dir) is not None:
                _run(["umount", "-l", fuse_dir], check=False, timeout=timeout)
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    for sig in (None, signal.SIGTERM, signal.SIGKILL) if kill else (None,):
        if sig is not None and pid_alive(pid) and (proc is not None or _is_nbdfuse(pid)):
            log.warning("nbdfuse %d did not exit after unmount; %s", pid, sig.name)
            os.kill(pid, sig)
        step_end = min(deadline, time.monotonic() + timeout / 3)
        while time.monotonic() < step_end:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not pid_alive(pid):
                return
            time.sleep(0.02)


def _wait_detached(device: str, backing: str, timeout: float) -> bool:
    """Wait (bounded) until `device` no longer sits on `backing` (autoclear is asynchronous)."""
    deadline = time.monotonic() + timeout
    while loop_devices().get(device) == backing:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- the mount ----------------------------------------------------------------

class Mount:
    """One NBD export mounted as ext4 at `mountpoint`.

    `up()` brings it to MOUNTED (making the filesystem only when the device
    holds no signature at all and `mkfs` is true); `down()` returns it to
    ABSENT. On any error `up()` tears down what it built and raises
    `MountError` (state FAILED until `down()`). Read-only mounts use
    `nbdfuse --readonly`, `losetup --read-only` and `mount -o ro,noload`.
    """

    def __init__(self, uri: str, mountpoint: str, *, tls_dir: str | None = None, read_only: bool = False,
                 mkfs: bool = True, bind_root: str | None = None, runtime_dir: str = "/run/opie/mounts",
                 name: str | None = None, mkfs_args: tuple[str, ...] = DEFAULT_MKFS_ARGS,
                 mount_options: tuple[str, ...] = (), expected_size: int | None = None,
                 timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(uri)
        query = urllib.parse.parse_qs(parts.query)
        tls_dir = tls_dir or (query.get("tls-certificates") or [None])[0]
        unix = parts.scheme == "nbd+unix" and bool(query.get("socket"))
        if not unix and (parts.scheme not in ("nbd", "nbds") or not parts.hostname):
            raise ValueError(f"uri: expected nbd://HOST[:PORT]/NAME, nbds://... or "
                             f"nbd+unix:///NAME?socket=PATH, got {uri!r}")
        if unix and tls_dir:
            raise ValueError("tls_dir: a Unix socket export is local and plain; no TLS")
        if tls_dir:
            parts = parts._replace(scheme="nbds", query=f"tls-certificates={tls_dir}")
        self.tls_dir = tls_dir
        if not unix:  # urlunsplit would drop the empty authority of nbd+unix:///
            uri = urllib.parse.urlunsplit(parts)
        if "nobarrier" in mount_options or "barrier=0" in mount_options:
            raise ValueError("mount_options: nobarrier would break the flush contract")
        self.uri = uri
        self.mountpoint = os.path.abspath(mountpoint)
        self.read_only = read_only
        self.mkfs = mkfs
        self.bind_root = os.path.abspath(bind_root or os.path.dirname(self.mountpoint))
        if not _under(self.mountpoint, self.bind_root) or self.mountpoint == self.bind_root:
            raise ValueError(f"mountpoint {self.mountpoint} is not below bind_root {self.bind_root}")
        self.runtime_dir = os.path.abspath(runtime_dir)
        self.name = name or (os.path.basename(self.mountpoint) + "-"
                             + hashlib.sha256(self.mountpoint.encode()).hexdigest()[:8])
        self.mkfs_args = tuple(mkfs_args)
        self.mount_options = tuple(mount_options)
        self.expected_size = expected_size
        self.timeout = timeout
        self.state = State.ABSENT
        self.device: str | None = None
        self.size: int | None = None
        self.made_filesystem = False
        self._proc: subprocess.Popen | None = None
        self._fuse_pid: int | None = None
        self._lock = threading.RLock()

    # paths
    @property
    def work_dir(self) -> str:
        return os.path.join(self.runtime_dir, self.name)

    @property
    def fuse_dir(self) -> str:
        return os.path.join(self.work_dir, "fuse")

    @property
    def fuse_file(self) -> str:
        return os.path.join(self.fuse_dir, FUSE_FILE)

    @property
    def fuse_pid(self) -> int | None:
        return self._fuse_pid

    def _set(self, new: State) -> None:
        if new is not State.FAILED and new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.name}: transition {self.state.value} -> {new.value} not allowed")
        log.debug("%s: %s -> %s", self.name, self.state.value, new.value)
        self.state = new

    # --- up ---
    def up(self) -> None:
        """Bring the mount to MOUNTED. Idempotent when already mounted."""
        with self._lock:
            if self.state in (State.MOUNTED, State.FROZEN):
                return
            if self.state is not State.ABSENT:
                self.down()
            self.made_filesystem = False
            stale = self._leftovers_of_others()
            if stale:
                raise MountError(errno.EBUSY, f"{self.name}: leftovers of an earlier mount ({', '.join(stale)}); "
                                              "run cleanup_stale")
            try:
                self._start_fuse()
                self._attach_loop()
                self._mount_fs()
            except BaseException as e:
                log.error("%s: up failed at %s: %s", self.name, self.state.value, e)
                self._set(State.FAILED)
                try:
                    self.down()
                except MountError as e2:
                    log.error("%s: teardown after a failed up: %s", self.name, e2)
                raise
            log.info("%s: mounted %s at %s (%s%s)", self.name, self.device, self.mountpoint,
                     "ro" if self.read_only else "rw", ", new filesystem" if self.made_filesystem else "")

    def _leftovers_of_others(self) -> list[str]:
        out = []
        if _mounted_at(self.fuse_dir) is not None:
            out.append(f"FUSE mount {self.fuse_dir}")
        out += [f"{d} over {b}" for d, b in loop_devices().items() if b == self.fuse_file]
        if _mounted_at(self.mountpoint) is not None:
            out.append(f"a filesystem at {self.mountpoint}")
        return out

    def _start_fuse(self) -> None:
        ensure_shared_root(self.runtime_dir)
        os.makedirs(self.fuse_dir, exist_ok=True)
        pidfile = os.path.join(self.work_dir, "nbdfuse.pid")
        ready = os.path.join(self.work_dir, "nbdfuse.ready")
        for p in (pidfile, ready):
            if os.path.exists(p):
                os.unlink(p)
        args = ["nbdfuse", "-P", ready] + (["--readonly"] if self.read_only else []) + [self.fuse_file]
        args += self._source_args()
        with open(os.path.join(self.work_dir, "nbdfuse.log"), "ab") as logf:
            # Own session: a Ctrl-C to the head's process group must not kill
            # nbdfuse under a mounted filesystem; down() stops it in order.
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                          start_new_session=True)
        self._fuse_pid = self._proc.pid
        with open(pidfile, "w") as f:
            f.write(f"{self._proc.pid}\n")
        self._set(State.FUSE_UP)
        deadline = time.monotonic() + self.timeout
        while True:
            if self._proc.poll() is not None:
                raise MountError(errno.ENXIO, f"nbdfuse exited with {self._proc.returncode}: {self._log_tail()}")
            if os.path.exists(ready):
                try:
                    st = os.stat(self.fuse_file)
                except OSError:
                    st = None
                if st is not None and st.st_size > 0:
                    if self.expected_size is not None and st.st_size != self.expected_size:
                        raise MountError(errno.EINVAL, f"{self.fuse_file}: size {st.st_size}, "
                                                       f"expected {self.expected_size}")
                    self.size = st.st_size
                    return
            if time.monotonic() > deadline:
                raise MountError(errno.ETIMEDOUT, f"nbdfuse not ready after {self.timeout}s: {self._log_tail()}")
            time.sleep(0.02)

    def _source_args(self) -> list[str]:
        """How nbdfuse reaches the export. nbdfuse 1.14 refuses `tls-certificates=` in a URI
        ("local file access is not allowed") and has no option for it, so a TLS export is
        reached through `nbdkit -s nbd ... tls-certificates=DIR` on nbdfuse's stdin/stdout
        (one connection, flushes pass through); plain exports by URI (multi-conn when offered)."""
        if not self.tls_dir:
            return [self.uri]
        parts = urllib.parse.urlsplit(self.uri)
        return ["--command", "nbdkit", "-s", "--exit-with-parent"] + (["-r"] if self.read_only else []) + [
            "nbd", f"hostname={parts.hostname}", f"port={parts.port or 10809}",
            f"export={urllib.parse.unquote(parts.path.lstrip('/'))}",
            "tls=require", f"tls-certificates={self.tls_dir}"]

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.work_dir, "nbdfuse.log"), "rb") as f:
                return f.read()[-1000:].decode(errors="replace").strip()
        except OSError:
            return ""

    def _attach_loop(self) -> None:
        args = ["losetup", "--find", "--show", "--direct-io=on"] + (["--read-only"] if self.read_only else [])
        res = _run(args + [self.fuse_file], timeout=self.timeout)
        self.device = res.stdout.strip()
        self._set(State.LOOP_ATTACHED)
        with open(f"/sys/block/{os.path.basename(self.device)}/loop/dio") as f:
            if f.read().strip() != "1":
                # Without direct I/O reads come from the page cache and run 2-3x slower.
                log.warning("%s: %s has direct I/O off", self.name, self.device)

    def _mount_fs(self) -> None:
        assert self.device is not None
        fstype = has_filesystem(self.device)
        if fstype is None:
            if self.read_only or not self.mkfs:
                raise MountError(errno.ENODEV, f"{self.device}: no filesystem on {self.uri}"
                                 + ("" if self.read_only else " and mkfs=False"))
            log.info("%s: no filesystem on %s; mkfs.ext4", self.name, self.device)
            _run(["mkfs.ext4", *self.mkfs_args, self.device], timeout=max(self.timeout, 300.0))
            self.made_filesystem = True
        elif fstype not in ("ext4", "ext3", "ext2"):
            raise MountError(errno.EMEDIUMTYPE, f"{self.device}: holds {fstype}, not ext4; refusing to touch it")
        ensure_shared_root(self.bind_root)
        os.makedirs(self.mountpoint, exist_ok=True)
        if _mounted_at(self.mountpoint) is not None:
            raise MountError(errno.EBUSY, f"{self.mountpoint}: something is already mounted there")
        opts = (["ro", "noload"] if self.read_only else []) + list(self.mount_options)
        args = ["mount", "-t", "ext4"] + (["-o", ",".join(opts)] if opts else []) + [self.device, self.mountpoint]
        _run(args, timeout=self.timeout)
        self._set(State.MOUNTED)

    # --- down ---
    def down(self) -> None:
        """Unmount, detach the loop device, stop nbdfuse, in that order: only what this
        object built (a crashed head's leftovers are `cleanup_stale`'s job). Every step is
        tried; raises `MountError` at the end (state FAILED) only if something is left."""
        with self._lock:
            errors: list[str] = []
            if self.state is State.FROZEN:
                try:
                    fsfreeze.thaw(self.mountpoint, self.timeout)
                except OSError as e:
                    errors.append(str(e))
            top = _mounted_at(self.mountpoint)
            if self.device is not None and top is not None and top.source == self.device:
                try:
                    _umount(self.mountpoint)
                except MountError as e:
                    errors.append(str(e))
            in_use = False
            if self.device is not None and loop_devices().get(self.device) == self.fuse_file:
                try:
                    _detach_loop(self.device)
                except MountError as e:
                    errors.append(str(e))
                # losetup -d on a busy device (a lazily unmounted filesystem still in use)
                # only sets autoclear: the device goes with its last user.
                in_use = not _wait_detached(self.device, self.fuse_file, 1.0)
            if in_use:
                errors.append(f"{self.mountpoint} lazily unmounted and still in use; {self.device} and nbdfuse "
                              f"stay until its last user goes (call down() again)")
            if self._proc is not None:
                try:
                    _stop_fuse(self.fuse_dir, self._proc.pid, self._proc, 1.0 if in_use else self.timeout,
                               kill=not in_use)
                except MountError as e:
                    errors.append(str(e))
            left = self._leftovers()
            if left:
                errors.append("left: " + ", ".join(left))
            if errors:
                self.state = State.FAILED
                msg = f"{self.name}: teardown incomplete: " + "; ".join(errors)
                log.error("%s", msg)
                raise MountError(errno.EBUSY, msg)
            if self.state is not State.ABSENT:
                log.info("%s: down", self.name)
            self.state = State.ABSENT
            self.device = None
            self._proc = None
            self._fuse_pid = None

    def _leftovers(self) -> list[str]:
        left = []
        if self._proc is not None and _mounted_at(self.fuse_dir) is not None:
            left.append(f"FUSE mount {self.fuse_dir}")
        if self._proc is not None and self._proc.poll() is None:
            left.append(f"nbdfuse pid {self._proc.pid}")
        return left

    # --- freeze ---
    @contextmanager
    def freeze(self, *, timeout: float = 30.0, max_frozen: float = 60.0) -> Iterator[None]:
        """Hold the filesystem frozen (every write blocked, everything flushed to the
        export as NBD FLUSH) for the body; always thawed afterwards (head.fsfreeze)."""
        with self._lock:
            if self.state is not State.MOUNTED:
                raise MountError(errno.EINVAL, f"{self.name}: freeze needs a mounted filesystem, not {self.state.value}")
            if self.read_only:
                raise MountError(errno.EROFS, f"{self.name}: a read-only mount need not be frozen")
            with fsfreeze.frozen(self.mountpoint, timeout=timeout, max_frozen=max_frozen):
                self._set(State.FROZEN)
                try:
                    yield
                finally:
                    self._set(State.MOUNTED)

    # --- status ---
    def status(self) -> dict[str, Any]:
        """A snapshot of the mount for `opie status`: never raises."""
        out: dict[str, Any] = {"name": self.name, "state": self.state.value, "uri": self.uri,
                               "mountpoint": self.mountpoint, "device": self.device, "fuse_pid": self._fuse_pid,
                               "read_only": self.read_only, "size": self.size, "used": None, "free": None}
        if self.state in (State.MOUNTED, State.FROZEN):
            try:
                st = os.statvfs(self.mountpoint)
                out["used"] = (st.f_blocks - st.f_bfree) * st.f_frsize
                out["free"] = st.f_bavail * st.f_frsize
            except OSError as e:
                out["error"] = f"statvfs: {e.strerror}"
        return out

    def __repr__(self) -> str:
        return f"Mount({self.name!r}, {self.state.value}, {self.device}, {self.mountpoint})"


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def cleanup_stale(runtime_dir: str, bind_root: str | None = None) -> list[str]:
    """Tear down what a crashed head left: filesystems on loop devices whose
    backing file is under `runtime_dir`, those loop devices, FUSE mounts under
    `runtime_dir` (dead ones say 'Transport endpoint is not connected') and
    their nbdfuse processes (pid files). With `bind_root`, also any other
    filesystem mounted below it. Returns what it removed; never raises for one
    leftover it cannot remove (logged), so a restarted head can try to mount."""
    runtime_dir = os.path.abspath(runtime_dir)
    removed: list[str] = []
    ours = {dev: back for dev, back in loop_devices().items() if _under(back, runtime_dir)}
    for m in sorted(mounts(), key=lambda m: -len(m.mountpoint)):
        if m.source in ours or (bind_root and _under(m.mountpoint, bind_root)
                                and os.path.abspath(m.mountpoint) != os.path.abspath(bind_root)
                                and m.fstype == "ext4"):
            try:
                _umount(m.mountpoint)
                removed.append(f"umount {m.mountpoint}")
            except MountError as e:
                log.error("stale %s: %s", m.mountpoint, e)
    for dev in ours:
        try:
            _detach_loop(dev)
            removed.append(f"losetup -d {dev}")
        except MountError as e:
            log.error("stale %s: %s", dev, e)
    for m in sorted(mounts(), key=lambda m: -len(m.mountpoint)):
        if m.fstype.startswith("fuse") and _under(m.mountpoint, runtime_dir) and m.mountpoint != runtime_dir:
            pid = _read_pid(os.path.join(os.path.dirname(m.mountpoint), "nbdfuse.pid"))
            _stop_fuse(m.mountpoint, pid, None, 10.0)
            removed.append(f"fusermount3 -u {m.mountpoint}")
    if os.path.isdir(runtime_dir):
        for name in os.listdir(runtime_dir):
            pid = _read_pid(os.path.join(runtime_dir, name, "nbdfuse.pid"))
            if pid is not None and pid_alive(pid) and _is_nbdfuse(pid):
                _stop_fuse(os.path.join(runtime_dir, name, "fuse"), pid, None, 10.0)
                removed.append(f"nbdfuse {pid}")
    if removed:
        log.warning("cleanup_stale %s: %s", runtime_dir, "; ".join(removed))
    return removed
