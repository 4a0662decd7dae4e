"""Scenario head-04: the head is SIGKILLed while a client writes files.

Fails: head0, with SIGKILL, while a writer creates files and fsyncs each.
Then: the head is restarted (it cleans up the dead mount, assembles the array
after an unclean stop, replays the volume journal, mounts ext4 which replays
its own journal); the volume is unmounted and checked.
Must hold: `e2fsck -fn` finds the filesystem clean, and every file whose
fsync returned before the crash is intact.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time

from scenario_support import nbdcopy_out, sha256_of, state, wait_until, write_file


def test_head_sigkill_during_writes(head_lab, tmp_path):
    lab, api = head_lab
    d = lab.dir / "mnt" / "vol0" / "s04"
    d.mkdir()
    durable: dict[str, str] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        i = 0
        try:
            while not stop.is_set():
                name = f"w{i}"
                durable[name] = write_file(d / name, 64_000 + (i % 7) * 50_000, seed=400 + i)
                i += 1
        except OSError as exc:  # the head is gone: EIO / ENOTCONN from the dead mount
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    wait_until(lambda: len(durable) >= 15, 60, "writer progress")
    lab.kill("head0")
    stop.set()
    t.join(60)
    assert not t.is_alive(), "writer stuck on the dead mount"
    survivors = dict(durable)
    assert len(survivors) >= 15

    lab.restart_head()
    wait_until(lambda: state(api) == "UUUUU", 60, "array whole after restart")
    # head_lab's API client reads the token from the head's state dir: same token
    api.call("POST", "/v1/volumes/vol0/unmount")
    try:
        image = tmp_path / "vol0.img"
        nbdcopy_out(api.status()["volumes"][0]["export"], lab.lab["tls_certificates"], image)
        fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        os.unlink(image)
    finally:
        api.call("POST", "/v1/volumes/vol0/mount")
    for name, digest in survivors.items():
        assert sha256_of(d / name) == digest, name
