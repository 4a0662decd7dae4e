"""The registry of share kinds: one base here; each kind lives beside its server
(`shares.smbd.SmbKind`, `shares.ganesha.NfsKind`), its renderer in `shares.smb` / `shares.nfs`.

A kind knows which shares it publishes, renders its server's config as a
pure function of a `ShareTable`, and makes the runner that starts, reloads
and stops that server. `ShareService` walks `KINDS` and never names a
protocol itself.
"""
from __future__ import annotations

import abc
import ipaddress
import logging
from typing import Any, ClassVar

from opie.shares.errors import ValidationErrors
from opie.shares.process import ServerProcess
from opie.shares.model import ABS_PATH_RE, Protocol, Share, ShareTable

log = logging.getLogger(__name__)

KINDS: dict[Protocol, type["ShareKind"]] = {}


def check_endpoint(errors: ValidationErrors, bind_address: str | None, port: int,
                   state_dir: str) -> None:
    """Add errors for a listen address, port or state dir unfit for a config file."""
    if bind_address is not None:
        try:
            ipaddress.ip_address(bind_address)
        except ValueError:
            errors.add("bind_address", f"{bind_address!r} is not an IP address")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        errors.add("port", f"{port!r} is not a TCP port")
    if not ABS_PATH_RE.fullmatch(state_dir):
        errors.add("state_dir", f"{state_dir!r} must be an absolute path of letters, digits, "
                   "'.', '_', '+' and '-'")


class ServerRunner(abc.ABC):
    """Lifecycle of one server process tree for one kind.

    `start` renders the config, launches the server and returns once it
    accepts connections; `apply` moves a running server to a new table
    without a restart and without dropping clients of unchanged shares;
    `stop` ends every process it started, by pid, and is safe to repeat.
    The table given is already validated.
    """

    child: ServerProcess | None = None  # the main server process, once started

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.alive

    @property
    def pid(self) -> int | None:
        """The main server's pid while it runs."""
        return self.child.pid if self.running and self.child else None

    @abc.abstractmethod
    def start(self, table: ShareTable) -> None: ...

    @abc.abstractmethod
    def apply(self, table: ShareTable) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


class ShareKind(abc.ABC):
    """One protocol: which shares it serves, its config text and its runner."""

    protocol: ClassVar[Protocol]

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        KINDS[cls.protocol] = cls

    def serves(self, share: Share) -> bool:
        return share.protocol.includes(self.protocol)

    def shares(self, table: ShareTable) -> list[Share]:
        return [s for s in table.shares if self.serves(s)]

    @abc.abstractmethod
    def render(self, table: ShareTable) -> str:
        """The server's whole config file for `table`; pure, no I/O."""

    @abc.abstractmethod
    def runner(self, **options: Any) -> ServerRunner:
        """A new, stopped runner for this kind's server; `options` are runner-specific."""
