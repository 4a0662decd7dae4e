"""Child processes of the share servers: start, wait until ready, stop by pid.

Only pids this module started (or read from a pid file written by a server
we started, after checking its command line) are ever signalled, and only
one pid at a time, never a process group. `stop` sends SIGTERM, waits, and
falls back to SIGKILL; it returns once the process is gone.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

from opie.shares.errors import CallError

log = logging.getLogger(__name__)


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             alive: Callable[[], bool] = lambda: True, interval: float = 0.05) -> None:
    """Poll `condition` until true.

    CallError(ETIMEDOUT) after `timeout` s, CallError(EIO) once `alive` turns false.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if not alive():
            raise CallError(f"{what}: process exited", errno.EIO)
        if time.monotonic() > deadline:
            raise CallError(f"{what}: not ready after {timeout:.0f} s", errno.ETIMEDOUT)
        time.sleep(interval)


def tcp_open(host: str, port: int) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for labs and tests)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def stop_pid(pid: int, name: str, timeout: float = 10.0) -> None:
    """SIGTERM one pid we own, wait for it to go, SIGKILL after `timeout` s."""
    if not pid_alive(pid):
        return
    log.info("%s: stopping pid %d", name, pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            log.warning("%s: pid %d ignored SIGTERM for %.0f s, killing", name, pid, timeout)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def stop_pidfile(path: Path, name: str, must_contain: str) -> None:
    """Stop the process named in pid file `path` if its command line contains `must_contain`.

    The check keeps a stale pid file from making us signal a stranger.
    """
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if any(must_contain in arg for arg in cmdline(pid)):
        stop_pid(pid, name)


class ServerProcess(Protocol):
    """What a runner needs of its server process, however it is launched."""

    name: str

    @property
    def pid(self) -> int | None: ...

    @property
    def alive(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def log_tail(self, lines: int = 20) -> str: ...


Launcher = Callable[[str, Sequence[str], Path, "Mapping[str, str] | None"], ServerProcess]
"""Makes a (stopped) server process from name, argv, log path and environment:
`Child` in the lab, `shares.systemd.systemd_launcher(...)` on systemd hosts."""


class Child:
    """One server process we started as our child; output goes to `log_path`."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive:
            raise CallError(f"{self.name}: already running as pid {self.pid}", errno.EEXIST)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            try:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, env=self.env)
            except OSError as exc:
                raise CallError(f"{self.name}: cannot run {self.argv[0]}: {exc}",
                                exc.errno or errno.EIO) from exc
        log.info("%s: started pid %d", self.name, self.proc.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process by pid and reap it; safe when never started or already gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            stop_pid(self.proc.pid, self.name, timeout)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - stop_pid already killed it
            pass
        log.info("%s: pid %d exited with %s", self.name, self.proc.pid, self.proc.returncode)


def run(argv: Sequence[str], what: str, stdin: bytes | None = None,
        env: Mapping[str, str] | None = None, timeout: float = 60) -> str:
    """Run a short command; its stdout, or CallError with its stderr on failure."""
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=timeout,
                              env=dict(env) if env is not None else None)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CallError(f"{what}: {exc}", getattr(exc, "errno", None) or errno.EIO) from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise CallError(f"{what}: {argv[0]} exited {done.returncode}: {message[-400:]}", errno.EIO)
    return done.stdout.decode(errors="replace")
