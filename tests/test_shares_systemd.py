"""The systemd adapter (shares.systemd) against a stand-in systemd Manager on a private bus.

PID 1 here is not systemd, so a small fake of org.freedesktop.systemd1
(StartTransientUnit, GetUnit, StopUnit, ActiveState, MainPID) runs the
servers as its own children. What is real: the D-Bus calls and types the
adapter sends, smbd and ganesha.nfsd themselves, and the clients.
No `from __future__ import annotations` here: dbus-next reads the
signature strings from the annotations.
"""
import asyncio
import os
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method

from opie.shares.clients import nfs_cmd, nfs_url, scratch_volume, smbclient
from opie.shares.dbus_bus import PrivateBus
from opie.shares.ganesha import GaneshaRunner
from opie.shares.model import Protocol, Share, ShareTable
from opie.shares.nfs import NfsSettings
from opie.shares.process import free_port, pid_alive
from opie.shares.smb import SmbSettings
from opie.shares.smbd import SmbdRunner
from opie.shares.systemd import systemd_launcher

HOST = "127.0.0.1"


class FakeUnit(ServiceInterface):
    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__("org.freedesktop.systemd1.Unit")
        self.proc = proc

    @dbus_property(access=PropertyAccess.READ)
    def ActiveState(self) -> "s":  # noqa: F821
        return "active" if self.proc.poll() is None else "inactive"


class FakeService(ServiceInterface):
    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__("org.freedesktop.systemd1.Service")
        self.proc = proc

    @dbus_property(access=PropertyAccess.READ)
    def MainPID(self) -> "u":  # noqa: F821
        return self.proc.pid if self.proc.poll() is None else 0


class FakeManager(ServiceInterface):
    def __init__(self, bus: MessageBus) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.bus = bus
        self.units: dict = {}
        self.calls: list = []

    @method()
    def StartTransientUnit(self, name: "s", mode: "s", properties: "a(sv)",  # noqa: F821
                           aux: "a(sa(sv))") -> "o":  # noqa: F821
        props = {key: value.value for key, value in properties}
        self.calls.append(("start", name, props))
        argv = props["ExecStart"][0][1]
        env = dict(os.environ)
        env.update(item.split("=", 1) for item in props["Environment"])
        with open(props["StandardOutput"].removeprefix("append:"), "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        path = "/org/freedesktop/systemd1/unit/u" + str(len(self.calls))
        self.bus.export(path, FakeUnit(proc))
        self.bus.export(path, FakeService(proc))
        self.units[name] = (path, proc)
        return "/org/freedesktop/systemd1/job/" + str(len(self.calls))

    @method()
    def GetUnit(self, name: "s") -> "o":  # noqa: F821
        if name not in self.units:
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return self.units[name][0]

    @method()
    def StopUnit(self, name: "s", mode: "s") -> "o":  # noqa: F821
        self.calls.append(("stop", name, mode))
        self.units[name][1].terminate()
        return "/org/freedesktop/systemd1/job/stop"


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[tuple[str, FakeManager]]:
    bus = PrivateBus(tmp_path / "bus")
    bus.start()
    ready = threading.Event()
    holder: dict = {}

    async def serve() -> None:
        conn = await MessageBus(bus_address=bus.address).connect()
        manager = FakeManager(conn)
        conn.export("/org/freedesktop/systemd1", manager)
        await conn.request_name("org.freedesktop.systemd1")
        holder["manager"], holder["loop"] = manager, asyncio.get_running_loop()
        holder["done"] = asyncio.Event()
        ready.set()
        await holder["done"].wait()
        conn.disconnect()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "fake systemd did not come up"
        yield bus.address, holder["manager"]
    finally:
        if "loop" in holder:
            holder["loop"].call_soon_threadsafe(holder["done"].set)
        thread.join(10)
        manager = holder.get("manager")
        for _, proc in (manager.units.values() if manager else []):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        bus.stop()


@pytest.fixture
def volume() -> Iterator[Path]:
    with scratch_volume() as root:
        yield root


def test_smbd_as_transient_unit(fake_systemd, tmp_path: Path, volume: Path) -> None:
    address, manager = fake_systemd
    for name in ("pub", "more"):
        (volume / name).mkdir()
        (volume / name / "hi.txt").write_text(name + "\n")
    settings = SmbSettings(state_dir=str(tmp_path / "smb"), port=free_port())
    runner = SmbdRunner(settings, launcher=systemd_launcher(address))
    table = ShareTable({"vol": str(volume)}).with_share(
        Share("pub", "vol", "pub", read_only=True, guest_ok=True))
    try:
        runner.start(table)
        kind, unit, props = manager.calls[0]
        assert kind == "start" and unit.startswith("opie-smbd-") and unit.endswith(".service")
        assert props["ExecStart"][0][1] == ["smbd", "--foreground", "--debug-stdout", "-s",
                                            str(settings.conf_path)]
        pid = runner.pid
        assert pid == manager.units[unit][1].pid
        assert smbclient(HOST, settings.port, "pub", None, None, "ls").returncode == 0
        runner.apply(table.with_share(Share("more", "vol", "more", read_only=True,
                                            guest_ok=True)))
        got = smbclient(HOST, settings.port, "more", None, None, f"get hi.txt {tmp_path / 'h'}")
        assert got.returncode == 0 and (tmp_path / "h").read_text() == "more\n"
        assert runner.pid == pid
    finally:
        runner.stop()
    assert ("stop", unit, "replace") in manager.calls
    assert not pid_alive(pid)


def test_ganesha_as_transient_unit(fake_systemd, tmp_path: Path, volume: Path) -> None:
    address, manager = fake_systemd
    (volume / "data").mkdir()
    (volume / "data" / "f.txt").write_text("over systemd\n")
    settings = NfsSettings(state_dir=str(tmp_path / "nfs"), port=free_port())
    runner = GaneshaRunner(settings, bus_address=address, launcher=systemd_launcher(address))
    table = ShareTable({"vol": str(volume)}).with_share(
        Share("data", "vol", "data", Protocol.NFS, networks=("127.0.0.1",)))
    try:
        runner.start(table)
        assert manager.calls[0][2]["Environment"] != []  # DBUS_SYSTEM_BUS_ADDRESS passed on
        url = nfs_url(HOST, settings.port, "/data/f.txt")
        assert nfs_cmd("nfs-cat", [url]).stdout == "over systemd\n"
        pid = runner.pid
    finally:
        runner.stop()
    assert pid is not None and not pid_alive(pid)
