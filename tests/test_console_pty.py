"""The ISU serial console over real ptys.

- socat pty pair, pyserial on both ends: the admin side (`run_admin_console`)
  reads status, sets name, address and head; the settings land in isu.json
  and the address is handed to the apply hook.
- os.openpty(): the ISU side on the slave through pyserial, a raw writer on
  the master sends hostile bytes (oversized lines, binary, bad values,
  unknown commands): each gets one `error:` line and isu.json is unchanged
  byte-for-byte; the console still answers afterwards.
"""
from __future__ import annotations

import ipaddress
import os
import select
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opie.isu import identity
from opie.isu.addressing import read_network
from opie.isu.console import LINE_MAX, ConsoleServer, open_console, run_admin_console


class RunningConsole:
    def __init__(self, device: str, state_dir: Path) -> None:
        self.port = open_console(device)
        self.applied: list[ipaddress.IPv4Interface] = []
        self.server = ConsoleServer(self.port, str(state_dir),
                                    status=lambda: {"uuid": identity.load(state_dir)["uuid"],
                                                    "state": "unconfigured"},
                                    apply_address=self.applied.append)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.stop()
        self.thread.join(5)
        self.port.close()  # type: ignore[attr-defined]


@pytest.fixture
def socat_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    isu_end, admin_end = tmp_path / "ttyISU", tmp_path / "ttyADMIN"
    proc = subprocess.Popen(["socat", f"pty,raw,echo=0,link={isu_end}",
                             f"pty,raw,echo=0,link={admin_end}"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not (isu_end.exists() and admin_end.exists()):
            assert time.monotonic() < deadline, "socat made no pty pair"
            time.sleep(0.02)
        yield str(isu_end), str(admin_end)
    finally:
        proc.terminate()
        proc.wait(5)


def test_admin_sets_and_reads_settings(socat_pair: tuple[str, str], tmp_path: Path) -> None:
    isu_dev, admin_dev = socat_pair
    state = tmp_path / "isu"
    uuid = identity.load(state)["uuid"]
    console = RunningConsole(isu_dev, state)
    try:
        replies = run_admin_console(admin_dev, [
            "status", "set name isu7", "set address 10.213.5.17/24", "set head 10.213.5.1:8080",
            "status", "help", "reboot now"])
    finally:
        console.close()
    first, name, address, head, status, helped, unknown = replies
    assert first.ok and first.fields()["address"] == "-" and first.fields()["uuid"] == uuid
    assert (name.final, address.final, head.final) == (
        "ok name isu7", "ok address 10.213.5.17/24", "ok head 10.213.5.1:8080")
    assert status.fields() == {"name": "isu7", "address": "10.213.5.17/24", "head": "10.213.5.1:8080",
                               "source": "console", "uuid": uuid, "state": "unconfigured"}
    assert helped.ok and any("set address" in line for line in helped.lines)
    assert not unknown.ok and unknown.final.startswith("error: unknown command")
    assert console.applied == [ipaddress.IPv4Interface("10.213.5.17/24")]
    persisted = read_network(str(state))
    assert (persisted.name, persisted.address, persisted.head, persisted.source) == (
        "isu7", "10.213.5.17/24", "10.213.5.1:8080", "console")


def _exchange(master: int, data: bytes, timeout: float = 5.0) -> list[str]:
    """Write raw bytes on the master side; collect answer lines up to the final ok/error line."""
    os.write(master, data)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            buf += os.read(master, 4096)
            lines = buf.decode("ascii").splitlines()
            if buf.endswith(b"\n") and lines and (lines[-1].startswith("ok") or lines[-1].startswith("error:")):
                return lines
    raise AssertionError(f"no final line after {data[:40]!r}; got {buf!r}")


def test_hostile_input_gets_an_error_and_changes_nothing(tmp_path: Path) -> None:
    master, slave = os.openpty()
    state = tmp_path / "isu"
    identity.load(state)
    console = None
    try:
        console = RunningConsole(os.ttyname(slave), state)
        assert _exchange(master, b"set address 10.213.5.20/24\n") == ["ok address 10.213.5.20/24"]
        config = state / identity.FILENAME
        before = config.read_bytes()
        hostile = {
            b"set name " + b"x" * (LINE_MAX + 10) + b"\n": "error: line too long",
            b"A" * 5000 + b"\r\n": "error: line too long",
            b"set name \xff\xfe\x00\x01\n": "error: expected printable ASCII",
            b"set address 300.1.1.1/24\n": "error: expected an address",
            b"set address 10.213.5.0/24\n": "error: expected a unicast host address",
            b"set address 10.213.5.21\n": "error: expected an address",
            b"set head 10.213.5.1:99999\n": "error: expected a head",
            b"set name bad/name\n": "error: expected a name",
            b"set address 10.213.5.21/24 extra\n": "error: unknown command",
            b"format disks\n": "error: unknown command",
        }
        for data, expected in hostile.items():
            lines = _exchange(master, data)
            assert len(lines) == 1 and lines[0].startswith(expected), (data[:40], lines)
            assert config.read_bytes() == before
        assert console.applied == [ipaddress.IPv4Interface("10.213.5.20/24")]
        # Still serving, with the earlier setting intact.
        lines = _exchange(master, b"status\r")
        assert "address: 10.213.5.20/24" in lines and lines[-1] == "ok"
    finally:
        if console is not None:
            console.close()
        os.close(master)
        os.close(slave)
