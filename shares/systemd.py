"""Servers as transient systemd services, driven over D-Bus (hosts that run systemd).

A thin adapter: `SystemdUnit` has the shape of `shares.process.Child`, so
`SmbdRunner(settings, launcher=systemd_launcher())` and the Ganesha runner
run their server as `opie-<server>-<id>.service` instead of a child process.
systemd then owns the process tree (smbd's samba-dcerpcd included: stopping
the unit kills its cgroup). Output is appended to the same log file as in
the lab. Calls: Manager.StartTransientUnit / StopUnit / GetUnit and the
Unit/Service properties ActiveState and MainPID.
"""
from __future__ import annotations

import hashlib
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from dbus_next import Variant

from opie.shares import dbus_bus
from opie.shares.errors import CallError
from opie.shares.process import Launcher, wait_for

log = logging.getLogger(__name__)

SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
PROPERTIES = "org.freedesktop.DBus.Properties"
RUNNING_STATES = ("active", "activating", "reloading")


def unit_name(name: str, log_path: Path) -> str:
    """'opie-smbd-1a2b3c4d.service': one unit per server and state dir."""
    tag = hashlib.sha1(str(log_path.parent).encode()).hexdigest()[:8]
    return f"opie-{name}-{tag}.service"


class SystemdUnit:
    """One server run by systemd as a transient service; same surface as `Child`."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, bus_address: str = SYSTEM_BUS) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
        self.bus_address = bus_address
        self.unit = unit_name(name, log_path)

    def _call(self, path: str, interface: str, member: str, signature: str = "",
              body: Sequence[Any] = ()) -> list[Any]:
        return dbus_bus.call(self.bus_address, SYSTEMD, path, interface, member, signature, body)

    def _property(self, interface: str, prop: str) -> Any:
        try:
            (path,) = self._call(MANAGER_PATH, MANAGER, "GetUnit", "s", [self.unit])
        except CallError:
            return None  # no such unit (transient units vanish once stopped)
        (value,) = self._call(path, PROPERTIES, "Get", "ss", [interface, prop])
        return value.value if isinstance(value, Variant) else value

    @property
    def pid(self) -> int | None:
        pid = self._property("org.freedesktop.systemd1.Service", "MainPID")
        return int(pid) if pid else None

    @property
    def alive(self) -> bool:
        return self._property("org.freedesktop.systemd1.Unit", "ActiveState") in RUNNING_STATES

    def start(self) -> None:
        """StartTransientUnit; returns once systemd reports a main pid."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        props = [
            ["Description", Variant("s", f"Opie {self.name}")],
            ["Type", Variant("s", "simple")],
            ["ExecStart", Variant("a(sasb)", [[self.argv[0], self.argv, False]])],
            ["Environment", Variant("as", [f"{k}={v}" for k, v in sorted(self.env.items())])],
            ["StandardOutput", Variant("s", f"append:{self.log_path}")],
            ["StandardError", Variant("s", f"append:{self.log_path}")],
            ["KillMode", Variant("s", "control-group")],
        ]
        self._call(MANAGER_PATH, MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))",
                   [self.unit, "fail", props, []])
        wait_for(lambda: self.pid is not None, 10, f"{self.unit} main pid")
        log.info("%s: started %s, pid %s", self.name, self.unit, self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """StopUnit and wait until the unit is gone or inactive; safe when not running."""
        if self._property("org.freedesktop.systemd1.Unit", "ActiveState") is None:
            return
        self._call(MANAGER_PATH, MANAGER, "StopUnit", "ss", [self.unit, "replace"])
        deadline = time.monotonic() + timeout
        while self.alive:
            if time.monotonic() > deadline:
                raise CallError(f"{self.unit}: still running {timeout:.0f} s after StopUnit",
                                errno.ETIMEDOUT)
            time.sleep(0.05)
        log.info("%s: stopped %s", self.name, self.unit)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def systemd_launcher(bus_address: str = SYSTEM_BUS) -> Launcher:
    """A launcher for SmbdRunner / GaneshaRunner that runs servers as systemd units."""
    def launch(name: str, argv: Sequence[str], log_path: Path,
               env: Mapping[str, str] | None) -> SystemdUnit:
        return SystemdUnit(name, argv, log_path, env, bus_address)
    return launch
