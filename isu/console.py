"""The ISU's serial console: a request/response line protocol over pyserial.

pyserial throws away pending input when a port is opened, so nothing is
sent unasked: the admin side writes one request line, the ISU answers with
zero or more `key: value` lines and a final line that is either `ok ...` or
`error: ...`. Requests are printable ASCII, at most LINE_MAX bytes; `\\r`,
`\\n` or both end a line; empty lines are ignored. Commands::

    help                   list the commands
    status                 name, address, head, source, plus the agent's status
    set name NAME          1..63 of [A-Za-z0-9-_.]
    set address A.B.C.D/P  persisted with source "console", then applied
    set head A.B.C.D:PORT  where the head's API is

A malformed, unknown or oversized request is answered with `error: ...` and
changes nothing. Settings go to the same ISU config (`isu.json`, through
`isu.addressing.update_network`) as a lease, durable before `ok` is sent.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from opie.isu.addressing import (ConfigError, parse_address, parse_head, parse_name, read_network,
                            update_network)

log = logging.getLogger(__name__)

LINE_MAX = 256
BAUDRATE = 115200
HELP = [
    "help: help                     this list",
    "help: status                   name, address, head and agent status",
    "help: set name NAME            1..63 of A-Z a-z 0-9 - _ .",
    "help: set address A.B.C.D/P    static address (persisted, applied now)",
    "help: set head A.B.C.D:PORT    address of the head's API",
]


class Port(Protocol):
    """What the console needs of a pyserial `Serial` (read with a timeout, write, in_waiting)."""

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...

    @property
    def in_waiting(self) -> int: ...


def read_available(port: Port) -> bytes:
    """Wait up to the port's timeout for one byte, then take whatever else is buffered."""
    first = port.read(1)
    if not first:
        return b""
    waiting = port.in_waiting
    return first + (port.read(waiting) if waiting else b"")


def _one_line(value: object) -> str:
    """A status value that cannot break the line framing."""
    return "".join(c if c.isprintable() else "?" for c in str(value))


class ConsoleServer:
    """Serve the console on `port` (an open pyserial port with a read timeout).

    `status()` adds agent lines (e.g. {"uuid": ..., "state": ...});
    `apply_address(iface)` puts a console-set address into effect once it is
    persisted (an error there is reported but the setting stays saved).
    `serve` runs until `stop` is called; one thread only.
    """

    def __init__(self, port: Port, state_dir: str,
                 status: Callable[[], dict[str, str]] | None = None,
                 apply_address: Callable[[ipaddress.IPv4Interface], None] | None = None) -> None:
        self.port = port
        self.state_dir = state_dir
        self.status = status
        self.apply_address = apply_address
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Read requests and answer them until `stop`; the port needs a read timeout."""
        buf = bytearray()
        overflow = False
        while not self._stop.is_set():
            chunk = read_available(self.port)
            if not chunk:
                continue
            for byte in chunk:
                if byte in (0x0A, 0x0D):
                    if overflow:
                        self._answer(["error: line too long (max %d bytes); nothing changed" % LINE_MAX])
                    elif buf:
                        self._answer(self.handle(bytes(buf)))
                    buf.clear()
                    overflow = False
                elif not overflow:
                    buf.append(byte)
                    if len(buf) > LINE_MAX:
                        overflow = True
                        buf.clear()

    def _answer(self, lines: list[str]) -> None:
        self.port.write("".join(line + "\n" for line in lines).encode("ascii", "replace"))

    def handle(self, raw: bytes) -> list[str]:
        """The answer lines to one request line (without its terminator)."""
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return ["error: expected printable ASCII; nothing changed"]
        if not text.isprintable():
            return ["error: expected printable ASCII; nothing changed"]
        words = text.split()
        if not words:
            return ["error: empty command (try help)"]
        try:
            return self._dispatch(words)
        except ConfigError as exc:
            return [f"error: {exc}; nothing changed"]

    def _dispatch(self, words: list[str]) -> list[str]:
        cmd = words[0].lower()
        if cmd == "help" and len(words) == 1:
            return HELP + ["ok"]
        if cmd == "status" and len(words) == 1:
            settings = read_network(self.state_dir)
            lines = [f"name: {settings.name or '-'}", f"address: {settings.address or '-'}",
                     f"head: {settings.head or '-'}", f"source: {settings.source or '-'}"]
            if self.status is not None:
                lines += [f"{_one_line(k)}: {_one_line(v)}" for k, v in self.status().items()]
            return lines + ["ok"]
        if cmd == "set" and len(words) == 3:
            what, value = words[1].lower(), words[2]
            if what == "name":
                update_network(self.state_dir, name=parse_name(value))
                log.info("console: name set to %s", value)
                return [f"ok name {value}"]
            if what == "head":
                host, port = parse_head(value)
                update_network(self.state_dir, head=f"{host}:{port}")
                log.info("console: head set to %s:%d", host, port)
                return [f"ok head {host}:{port}"]
            if what == "address":
                iface = parse_address(value)
                update_network(self.state_dir, address=str(iface), source="console",
                               lease_expires=None)
                log.info("console: address set to %s", iface)
                if self.apply_address is not None:
                    try:
                        self.apply_address(iface)
                    except Exception as exc:  # saved; say that applying failed
                        log.error("console: applying %s failed: %s", iface, exc)
                        return [f"error: saved {iface} but could not apply it now: {exc}"]
                return [f"ok address {iface}"]
        return [f"error: unknown command {' '.join(words)[:40]!r} (try help)"]


class ConsoleError(Exception):
    """The console did not answer, or answered `error: ...` (the text is the message)."""


@dataclass(frozen=True)
class ConsoleReply:
    ok: bool
    lines: list[str]          # the `key: value` lines before the final line
    final: str                # the final `ok ...` / `error: ...` line

    def fields(self) -> dict[str, str]:
        return dict(line.split(": ", 1) for line in self.lines if ": " in line)


class ConsoleClient:
    """Admin side: send one request at a time and read its answer (blocking)."""

    def __init__(self, port: Port, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self._pending = b""

    def request(self, command: str) -> ConsoleReply:
        """Send `command`, return the reply; raises ConsoleError on timeout or bad input."""
        if "\n" in command or "\r" in command or len(command.encode()) > LINE_MAX:
            raise ConsoleError(f"a console command is one line of at most {LINE_MAX} bytes")
        self._pending = b""
        self.port.write(command.encode("ascii", "replace") + b"\n")
        lines: list[str] = []
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            self._pending += read_available(self.port)
            while b"\n" in self._pending:
                raw, self._pending = self._pending.split(b"\n", 1)
                line = raw.decode("ascii", "replace").rstrip("\r")
                if line == "ok" or line.startswith("ok ") or line.startswith("error:"):
                    return ConsoleReply(line.startswith("ok"), lines, line)
                lines.append(line)
        raise ConsoleError(f"no answer to {command!r} within {self.timeout} s")


def open_console(device: str, baudrate: int = BAUDRATE, read_timeout: float = 0.2) -> Port:
    """Open a serial device for the console (either side) with pyserial."""
    import serial

    return serial.Serial(device, baudrate=baudrate, timeout=read_timeout)  # type: ignore[no-any-return]


def run_admin_console(device: str, commands: list[str], timeout: float = 5.0) -> list[ConsoleReply]:
    """What `opie isu console DEVICE` runs: each command in turn, the replies in order.

    An `error:` reply does not stop the run (the ISU changed nothing for
    it); the caller reports it and exits non-zero. Raises ConsoleError when
    the ISU does not answer.
    """
    port = open_console(device)
    try:
        client = ConsoleClient(port, timeout)
        return [client.request(command) for command in commands]
    finally:
        port.close()  # type: ignore[attr-defined]
