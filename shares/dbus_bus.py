"""A private D-Bus daemon, and short method calls on it with dbus-next.

Ganesha adds and removes exports over D-Bus. Hosts without a system bus
(the lab, tests) get a private `dbus-daemon --nofork` on a unix socket under
the state dir; Ganesha is pointed at it with DBUS_SYSTEM_BUS_ADDRESS.
Functions prefixed `async_` run on the caller's event loop; the plain ones
run a private loop and must not be called from inside a running loop.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from pathlib import Path
from typing import Any, Sequence

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from opie.shares.errors import CallError
from opie.fileio import atomic_write
from opie.shares.process import Child, wait_for

log = logging.getLogger(__name__)

MAX_SOCKET_PATH = 107

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy user="root">
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
  <policy context="default">
    <deny own="*"/>
    <deny send_destination="*"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """A dbus-daemon child serving one unix socket; only root may use it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / "bus.sock"
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise CallError(f"dbus: socket path too long for AF_UNIX: {self.socket}",
                            errno.ENAMETOOLONG)
        self.address = f"unix:path={self.socket}"
        self.child = Child("dbus-daemon", ["dbus-daemon", f"--config-file={state_dir / 'bus.conf'}",
                                           "--nofork", "--print-address=1"],
                           state_dir / "bus.log")

    def _accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
                return True
            except OSError:
                return False

    def start(self) -> None:
        """Start the daemon; returns once its socket accepts connections."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_dir / "bus.conf", BUS_CONFIG.format(socket=self.socket))
        self.socket.unlink(missing_ok=True)
        self.child.start()
        wait_for(self._accepting, 10, "dbus-daemon", alive=lambda: self.child.alive)

    def stop(self) -> None:
        self.child.stop()
        self.socket.unlink(missing_ok=True)


async def async_call(address: str, destination: str, path: str, interface: str, member: str,
                     signature: str = "", body: Sequence[Any] = ()) -> list[Any]:
    """One method call; its reply body, or CallError naming the D-Bus error."""
    try:
        bus = await MessageBus(bus_address=address).connect()
    except (OSError, Exception) as exc:  # dbus-next raises bare Exceptions on auth failure
        raise CallError(f"dbus {address}: {exc}", errno.ECONNREFUSED) from exc
    try:
        reply = await bus.call(Message(destination=destination, path=path, interface=interface,
                                       member=member, signature=signature, body=list(body)))
    finally:
        bus.disconnect()
    if reply is None:
        raise CallError(f"dbus {member}: no reply", errno.EIO)
    if reply.message_type == MessageType.ERROR:
        detail = reply.body[0] if reply.body else ""
        raise CallError(f"dbus {member}: {reply.error_name}: {detail}", errno.EIO)
    return list(reply.body)


def call(address: str, destination: str, path: str, interface: str, member: str,
         signature: str = "", body: Sequence[Any] = (), timeout: float = 30) -> list[Any]:
    """Blocking `async_call` on a private event loop, bounded by `timeout` seconds."""
    async def bounded() -> list[Any]:
        return await asyncio.wait_for(
            async_call(address, destination, path, interface, member, signature, body), timeout)
    try:
        return asyncio.run(bounded())
    except asyncio.TimeoutError as exc:
        raise CallError(f"dbus {member}: no reply in {timeout:.0f} s", errno.ETIMEDOUT) from exc
