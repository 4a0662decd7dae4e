"""NBD URIs as libnbd and qemu spell them: nbd://HOST[:PORT]/EXPORT and
nbds://... for TLS (the NBD URI spec, doc/uri.md upstream). Pure parsing."""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

DEFAULT_PORT = 10809


@dataclass(frozen=True)
class NBDURI:
    tls: bool
    host: str
    port: int
    export: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'nbds' if self.tls else 'nbd'}://{host}:{self.port}/{urllib.parse.quote(self.export)}"


def parse(uri: str) -> NBDURI:
    """Parse an nbd:// or nbds:// URI; ValueError with the reason otherwise.
    Query parameters (such as tls-certificates) are ignored here."""
    u = urllib.parse.urlsplit(uri)
    if u.scheme not in ("nbd", "nbds"):
        raise ValueError(f"{uri!r}: expected an nbd:// or nbds:// URI")
    if not u.hostname:
        raise ValueError(f"{uri!r}: no host")
    try:
        port = u.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{uri!r}: invalid port") from None
    return NBDURI(u.scheme == "nbds", u.hostname, port, urllib.parse.unquote(u.path.lstrip("/")))
