"""Processes for tests: start real servers, wait (bounded) until they are
ready, and stop them by pid even when a test fails."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field


def random_file(path, size: int, seed: int = 1) -> None:
    """Incompressible pseudo-random data (seeded), written in 8 MiB pieces:
    fast enough for a GiB. Shared by tests and benchmarks."""
    import numpy as np
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: by pid, never by process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP `pid` and wait until every one of its threads is stopped.

    kill() returns before the group stop is complete: the kernel wakes one
    thread to start it, and until that thread runs the others (the ISU's
    worker loops) may still answer requests. Tests that need a silent peer
    wait here."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue  # a thread that just exited
        if states and all(s in ("T", "t") for s in states):
            return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} not stopped after {timeout}s")


def read_ready(proc: subprocess.Popen, timeout: float) -> dict | None:
    """The process's JSON ready line on its stdout pipe ({"event": "ready", ...}),
    waited for at most `timeout` s; None if it did not come (timeout or EOF)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([proc.stdout], [], [], left)[0]:
            line = proc.stdout.readline()
            if not line:
                return None
            if line.startswith(b"{") and json.loads(line).get("event") == "ready":
                return json.loads(line)
    return None


@dataclass
class ISUProcess:
    proc: subprocess.Popen
    ready: dict
    log_path: str
    args: list = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.ready["listen"].rsplit(":", 1)[1])

    @property
    def uuid(self) -> str:
        return self.ready["uuid"]

    def url(self, export: str, tls_dir: str | None = None) -> str:
        if tls_dir:
            return f"nbds://127.0.0.1:{self.port}/{export}?tls-certificates={tls_dir}"
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def start_isu(state_dir: str, disks: list[str], *, tls_dir: str | None = None, port: int = 0,
              timeout: float = 20.0, extra: list[str] | None = None) -> ISUProcess:
    """Run `opie isu serve` and wait for its ready line."""
    args = [sys.executable, "-m", "opie.cli.main", "-v", "isu", "serve", "--listen", f"127.0.0.1:{port}",
            "--state-dir", state_dir]
    for d in disks:
        args += ["--disk", d]
    if tls_dir:
        args += ["--tls-dir", tls_dir]
    args += extra or []
    os.makedirs(state_dir, exist_ok=True)
    log_path = os.path.join(state_dir, "isu.log")
    logf = open(log_path, "ab")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL)
    logf.close()
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        chunk = proc.stdout.read() or b""
        buf += chunk
        for line in buf.splitlines():
            if line.startswith(b"{"):
                msg = json.loads(line)
                if msg.get("event") == "ready":
                    return ISUProcess(proc, msg, log_path, args)
        if proc.poll() is not None:
            raise RuntimeError(f"ISU exited with {proc.returncode}: {open(log_path).read()[-2000:]}")
        time.sleep(0.05)
    stop(proc)
    raise TimeoutError(f"ISU not ready after {timeout}s: {open(log_path).read()[-2000:]}")


def start_nbdkit(image: str, port: int | None = None, extra: list[str] | None = None,
                 plugin: str = "file") -> tuple[subprocess.Popen, int]:
    port = port or free_port()
    args = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port)] + (extra or []) + [plugin, f"file={image}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
    except TimeoutError:
        stop(proc)
        raise
    return proc, port
