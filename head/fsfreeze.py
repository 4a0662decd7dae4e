"""Freeze a mounted filesystem for a consistent snapshot, and always thaw it.

`fsfreeze -f` flushes the filesystem (dirty data, journal, and a device cache
flush) and then blocks every new write until `fsfreeze -u`. A snapshot of the
block device taken while frozen is what a clean umount would have left.

Contract of `frozen()`:
- on entry the filesystem is frozen, or `FreezeError` is raised and nothing is
  frozen (a freeze that does not finish within `timeout` is undone);
- on exit the filesystem is thawed, whether the body returned or raised;
- the filesystem never stays frozen longer than `max_frozen` seconds: a
  watchdog thaws it and the block then raises `FreezeExpired` (the body's
  snapshot may not be consistent and should be discarded).
"""
from __future__ import annotations

import errno
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

FSFREEZE = "fsfreeze"


class FreezeError(OSError):
    """fsfreeze failed or did not finish in time; carries an errno."""


class FreezeExpired(FreezeError):
    """The watchdog thawed the filesystem before the frozen block ended."""


def _run(flag: str, mountpoint: str, timeout: float) -> None:
    try:
        res = subprocess.run([FSFREEZE, flag, mountpoint], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise FreezeError(errno.ETIMEDOUT, f"{mountpoint}: fsfreeze {flag} did not finish in {timeout}s") from e
    if res.returncode != 0:
        msg = res.stderr.strip() or f"exit {res.returncode}"
        code = errno.EINVAL if "Invalid argument" in msg else errno.EIO
        raise FreezeError(code, f"{mountpoint}: fsfreeze {flag}: {msg}")


def freeze(mountpoint: str, timeout: float = 30.0) -> None:
    """Freeze `mountpoint`; on a timeout it tries to thaw before raising."""
    try:
        _run("-f", mountpoint, timeout)
    except FreezeError as e:
        if e.errno == errno.ETIMEDOUT:
            # The freeze may complete after we gave up; do not leave it frozen.
            try:
                thaw(mountpoint, timeout)
            except FreezeError:
                log.warning("%s: thaw after a timed-out freeze failed", mountpoint)
        raise


def thaw(mountpoint: str, timeout: float = 30.0) -> None:
    """Thaw `mountpoint`. Thawing a filesystem that is not frozen is not an error."""
    try:
        _run("-u", mountpoint, timeout)
    except FreezeError as e:
        if e.errno == errno.EINVAL:     # not frozen
            return
        raise


def _thaw_hard(mountpoint: str, timeout: float, attempts: int = 3) -> None:
    """Thaw, retrying: a filesystem left frozen blocks every writer."""
    for attempt in range(attempts):
        try:
            thaw(mountpoint, timeout)
            log.info("%s: thawed", mountpoint)
            return
        except FreezeError as e:
            log.error("%s: thaw failed (attempt %d): %s", mountpoint, attempt + 1, e)
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)


@contextmanager
def frozen(mountpoint: str, *, timeout: float = 30.0, max_frozen: float = 60.0) -> Iterator[None]:
    """Hold `mountpoint` frozen for the body of a `with` block (contract above)."""
    freeze(mountpoint, timeout)
    log.info("%s: frozen", mountpoint)
    expired = threading.Event()
    done = threading.Event()

    def watchdog() -> None:
        if done.wait(max_frozen):
            return
        expired.set()
        log.warning("%s: frozen longer than %.1fs, thawing", mountpoint, max_frozen)
        try:
            thaw(mountpoint, timeout)
        except FreezeError as e:
            log.error("%s: watchdog thaw failed: %s", mountpoint, e)

    dog = threading.Thread(target=watchdog, name=f"thaw-watchdog {mountpoint}", daemon=True)
    dog.start()
    try:
        yield
    finally:
        done.set()
        dog.join()
        if not expired.is_set():
            _thaw_hard(mountpoint, timeout)
    if expired.is_set():
        raise FreezeExpired(errno.ETIMEDOUT, f"{mountpoint}: thawed by the watchdog after {max_frozen}s")
