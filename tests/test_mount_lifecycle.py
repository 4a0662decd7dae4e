"""head/mount.py against real NBD exports (nbdkit): nbdfuse -> loop (direct I/O) -> ext4.

Every nbdkit and helper process is stopped by pid; every Mount is torn down,
and leftovers under the test's runtime dir are removed, in fixture finalizers
even when a test fails. Tests check /proc/self/mountinfo and sysfs for loop
devices, so a leak fails the test that caused it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import time

import pytest
from proc_support import free_port, stop, wait_port

from opie.head.mount import (
    Mount,
    MountError,
    State,
    cleanup_stale,
    loop_devices,
    mounts,
    release_shared_root,
)

SIZE = 256 * 1024 * 1024


def start_nbdkit(args: list[str], tls_dir: str | None = None) -> tuple[subprocess.Popen, int]:
    """nbdkit -f on a free loopback port with `args` (filters, plugin, params)."""
    port = free_port()
    tls = ["--tls=require", f"--tls-certificates={tls_dir}", "--tls-verify-peer"] if tls_dir else []
    proc = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *tls, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port)
    except TimeoutError:
        stop(proc)
        raise
    return proc, port


class Rig:
    """nbdkit servers and Mounts of one test, all under one tmp dir."""

    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.runtime_dir = str(tmp / "run")
        self.bind_root = str(tmp / "mnt")
        self.procs: list[subprocess.Popen] = []
        self.mounts: list[Mount] = []

    def nbdkit(self, args: list[str], tls_dir: str | None = None) -> tuple[subprocess.Popen, str]:
        proc, port = start_nbdkit(args, tls_dir)
        self.procs.append(proc)
        scheme = "nbds" if tls_dir else "nbd"
        return proc, f"{scheme}://127.0.0.1:{port}/vol"

    def mount(self, uri: str, name: str = "vol", **kw) -> Mount:
        kw.setdefault("bind_root", self.bind_root)
        kw.setdefault("runtime_dir", self.runtime_dir)
        m = Mount(uri, os.path.join(self.bind_root, name), name=name, **kw)
        self.mounts.append(m)
        return m

    def ours(self) -> tuple[list[str], dict[str, str]]:
        """Mounts below the tmp dir (other than the two bind roots) and loop devices over our files."""
        roots = {self.runtime_dir, self.bind_root}
        ms = [m.mountpoint for m in mounts() if m.mountpoint.startswith(str(self.tmp)) and m.mountpoint not in roots]
        loops = {d: b for d, b in loop_devices().items() if b.startswith(str(self.tmp))}
        return ms, loops

    def close(self) -> None:
        for m in reversed(self.mounts):
            try:
                m.down()
            except Exception:       # noqa: BLE001 — keep tearing down
                pass
        cleanup_stale(self.runtime_dir, self.bind_root)
        for p in self.procs:
            stop(p)
        release_shared_root(self.bind_root)
        release_shared_root(self.runtime_dir)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()
    ms, loops = r.ours()
    assert not ms and not loops, f"leaked mounts {ms}, loop devices {loops}"
    assert not [m for m in mounts() if m.mountpoint.startswith(str(tmp_path))]


def blank_image(tmp_path, size: int = SIZE, name: str = "disk.img") -> str:
    image = str(tmp_path / name)
    with open(image, "wb") as f:
        f.truncate(size)
    return image


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_files(root: str, n: int = 5, size: int = 512 * 1024) -> dict[str, str]:
    out = {}
    for i in range(n):
        p = os.path.join(root, f"f{i}.bin")
        with open(p, "wb") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
        out[p] = sha(p)
    return out


def e2fsck_clean(image: str) -> None:
    res = subprocess.run(["e2fsck", "-f", "-n", image], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def assert_torn_down(rig: Rig, m: Mount) -> None:
    ms, loops = rig.ours()
    assert m.state is State.ABSENT
    assert not ms, ms
    assert not loops, loops
    assert subprocess.run(["losetup", "-j", m.fuse_file], capture_output=True, text=True).stdout == ""


def up_without_mkfs_and_check(rig: Rig, m: Mount, files: dict[str, str], image: str | None = None) -> None:
    """up() finds the filesystem (no mkfs), the files read back equal, down() leaves nothing,
    and (given the image) e2fsck -n finds it clean."""
    m.up()
    assert not m.made_filesystem
    assert {p: sha(p) for p in files} == files
    m.down()
    assert_torn_down(rig, m)
    if image:
        e2fsck_clean(image)


def test_mkfs_on_first_use_then_data_survives_remount(rig, tmp_path):
    """mkfs only on first use; files read back equal after umount/remount; e2fsck -n clean."""
    image = blank_image(tmp_path)
    _, uri = rig.nbdkit(["file", f"file={image}"])
    m = rig.mount(uri, expected_size=SIZE)
    m.up()
    assert m.state is State.MOUNTED and m.made_filesystem
    st = m.status()
    assert st["device"].startswith("/dev/loop") and st["size"] == SIZE and st["fuse_pid"] > 0
    assert st["free"] > 0 and st["used"] > 0
    with open(f"/sys/block/{os.path.basename(m.device)}/loop/dio") as f:
        assert f.read().strip() == "1"
    files = write_files(m.mountpoint)
    m.down()
    assert_torn_down(rig, m)
    e2fsck_clean(image)

    up_without_mkfs_and_check(rig, m, files)                 # the same object again
    up_without_mkfs_and_check(rig, rig.mount(uri), files, image)   # a fresh one (a restarted head)


def test_read_only_mount_refuses_writes(rig, tmp_path):
    image = blank_image(tmp_path)
    _, uri = rig.nbdkit(["file", f"file={image}"])
    rw = rig.mount(uri)
    rw.up()
    files = write_files(rw.mountpoint, n=2)
    rw.down()
    before = sha(image)
    ro = rig.mount(uri, read_only=True)
    ro.up()
    assert "ro" in next(x for x in mounts() if x.mountpoint == ro.mountpoint).options.split(",")
    assert {p: sha(p) for p in files} == files
    with pytest.raises(OSError) as e:
        open(os.path.join(ro.mountpoint, "new"), "wb")
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:        # the layers below refuse too
        os.open(ro.fuse_file, os.O_WRONLY)
    assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    ro.down()
    assert_torn_down(rig, ro)
    assert sha(image) == before


def test_never_mkfs_over_a_signature_or_when_not_asked(rig, tmp_path):
    """A device holding another signature (swap) is refused and left untouched; an empty
    device with mkfs=False or read-only is refused too. Each failed up() leaves nothing."""
    image = blank_image(tmp_path, 64 << 20, name="swap.img")
    subprocess.run(["mkswap", image], check=True, capture_output=True)
    before = sha(image)
    _, uri = rig.nbdkit(["file", f"file={image}"])
    m = rig.mount(uri)
    with pytest.raises(MountError) as e:
        m.up()
    assert e.value.errno == errno.EMEDIUMTYPE and "swap" in str(e.value)
    assert_torn_down(rig, m)
    assert sha(image) == before

    _, empty = rig.nbdkit(["memory", "64M"])
    for kw in ({"mkfs": False}, {"read_only": True}):
        m = rig.mount(empty, name="empty", **kw)
        with pytest.raises(MountError) as e:
            m.up()
        assert e.value.errno == errno.ENODEV
        assert_torn_down(rig, m)


def test_teardown_after_server_sigkill(rig):
    """The NBD server dies under a mounted filesystem: down() still completes, leaving
    no mount, no loop device, no nbdfuse."""
    proc, uri = rig.nbdkit(["memory", "256M"])
    m = rig.mount(uri)
    m.up()
    write_files(m.mountpoint, n=1)
    pid = m.fuse_pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    with open(os.path.join(m.mountpoint, "late"), "wb") as f:   # dirty data that can never be written
        f.write(b"x" * 65536)
    t = time.monotonic()
    m.down()
    assert time.monotonic() - t < 30
    assert_torn_down(rig, m)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_cleanup_stale_after_a_crashed_head(rig, tmp_path):
    """A head died (its Mount object is gone, nbdfuse SIGKILLed: the FUSE mount says
    'Transport endpoint is not connected'). cleanup_stale removes the leftovers and a
    new Mount comes up on the same paths with the data intact."""
    image = blank_image(tmp_path)
    _, uri = rig.nbdkit(["file", f"file={image}"])
    crashed = Mount(uri, os.path.join(rig.bind_root, "vol"), name="vol", bind_root=rig.bind_root,
                    runtime_dir=rig.runtime_dir)
    crashed.up()
    files = write_files(crashed.mountpoint, n=2)
    os.kill(crashed.fuse_pid, signal.SIGKILL)
    crashed._proc.wait(5)            # reap (the crashed head's child)
    with pytest.raises(OSError) as e:
        os.stat(crashed.fuse_file)
    assert e.value.errno == errno.ENOTCONN
    ms, loops = rig.ours()
    assert ms and loops

    fresh = rig.mount(uri)
    with pytest.raises(MountError):  # refuses to stack on the leftovers
        fresh.up()
    removed = cleanup_stale(rig.runtime_dir, rig.bind_root)
    assert any(r.startswith("losetup -d") for r in removed) and any(r.startswith("umount") for r in removed)
    ms, loops = rig.ours()
    assert not ms and not loops
    up_without_mkfs_and_check(rig, fresh, files, image)


def test_umount_propagates_into_a_copied_mount_namespace(rig):
    """A process in its own mount namespace (like `ip netns exec`) holds a copy of the
    mount table; thanks to the rshared bind roots, down() still frees the loop device
    and the FUSE mount, and the copy loses the mounts too."""
    _, uri = rig.nbdkit(["memory", "128M"])
    m = rig.mount(uri)
    m.up()
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while m.mountpoint not in open(f"/proc/{holder.pid}/mountinfo").read():
            assert time.monotonic() < deadline, "the namespace copy never saw the mount"
            time.sleep(0.02)
        m.down()
        assert_torn_down(rig, m)
        copy = open(f"/proc/{holder.pid}/mountinfo").read()
        assert m.mountpoint not in copy and m.fuse_dir not in copy
    finally:
        stop(holder)


def test_tls_export(rig, cluster_tls):
    """nbds:// with client certificates: nbdkit requires TLS and verifies the peer."""
    _, uri = rig.nbdkit(["memory", "128M"], tls_dir=cluster_tls["dir"])
    m = rig.mount(uri, tls_dir=cluster_tls["dir"])
    m.up()
    assert "tls-certificates=" in m.uri and m.uri.startswith("nbds://")
    files = write_files(m.mountpoint, n=2)
    m.down()
    up_without_mkfs_and_check(rig, m, files)
    plain = rig.mount(uri.replace("nbds://", "nbd://"), name="plain", timeout=10)
    with pytest.raises(MountError):   # no TLS: nbdkit refuses, nbdfuse exits, nothing is left
        plain.up()
    assert_torn_down(rig, plain)


def test_busy_filesystem_is_lazily_unmounted_and_kept_alive_for_its_user(rig):
    """A process still works in the filesystem at down(): the umount goes lazy, the
    loop device and nbdfuse stay for that user (never killed under it), down() says
    so; once the user leaves, a second down() finds everything gone."""
    _, uri = rig.nbdkit(["memory", "128M"])
    m = rig.mount(uri)
    m.up()
    path = os.path.join(m.mountpoint, "held")
    holder = subprocess.Popen(["sh", "-c", "exec 3<>held; echo ready; read x; echo late >&3; sync -f held"],
                              cwd=m.mountpoint, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(MountError) as e:
            m.down()
        assert e.value.errno == errno.EBUSY and "still in use" in str(e.value)
        assert m.state is State.FAILED
        assert not [x for x in mounts() if x.mountpoint in (m.mountpoint, m.fuse_dir)]   # detached from view
        assert m.device in loop_devices() and m.fuse_pid and os.path.exists(f"/proc/{m.fuse_pid}")
        holder.communicate("go\n", timeout=10)       # the user still writes and syncs fine
        assert holder.returncode == 0
    finally:
        stop(holder)
    deadline = time.monotonic() + 10
    while True:
        try:
            m.down()
            break
        except MountError:
            assert time.monotonic() < deadline, "leftovers stayed after the last user left"
            time.sleep(0.1)
    assert_torn_down(rig, m)
    assert not os.path.exists(path)                  # the mountpoint is an empty directory again


def test_read_only_mount_of_an_image_whose_journal_needs_recovery(rig, tmp_path):
    """A crash-consistent copy (taken while mounted, not frozen) has a journal that needs
    replay; a read-only mount skips it (noload) instead of failing on a read-only device.
    What it shows is the last checkpoint, without the journal's newer commits: so
    snapshots meant to be mounted are taken frozen (see the opie_export test)."""
    image = blank_image(tmp_path)
    _, uri = rig.nbdkit(["file", f"file={image}"])
    m = rig.mount(uri)
    m.up()
    write_files(m.mountpoint, n=2)
    copy = str(tmp_path / "copy.img")
    subprocess.run(["cp", "--sparse=always", image, copy], check=True, timeout=60)
    m.down()
    res = subprocess.run(["dumpe2fs", "-h", copy], capture_output=True, text=True, timeout=30)
    assert "needs_recovery" in res.stdout
    _, ro_uri = rig.nbdkit(["-r", "file", f"file={copy}"])
    ro = rig.mount(ro_uri, name="copy", read_only=True)
    ro.up()
    assert ro.state is State.MOUNTED
    assert "lost+found" in os.listdir(ro.mountpoint)
    ro.down()
    assert_torn_down(rig, ro)
