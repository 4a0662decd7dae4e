"""Helpers for the head scenarios: bounded waits, files with known contents."""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path


def wait_until(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last: {last!r})")


def write_file(path: Path, size: int, seed: int) -> str:
    """Write `size` pseudo-random bytes, fsync, return their sha256."""
    import numpy as np
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def state(api) -> str:
    return api.status()["array"]["state"]


def nbdcopy_out(uri: str, tls_dir: str, dest: Path) -> None:
    subprocess.run(["nbdcopy", f"{uri}?tls-certificates={tls_dir}", str(dest)], check=True, timeout=300)
