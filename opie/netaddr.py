"""The one parser of HOST:PORT addresses (listen addresses, heads, share URLs).

This module imports nothing of Opie, so any package may use it.
"""
from __future__ import annotations


def parse_host_port(text: str, *, default_host: str | None = None, allow_port_zero: bool = False
                    ) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port).

    An empty host takes `default_host` (refused when it is None). Port 0 (an
    ephemeral port, for listeners) only with `allow_port_zero`. Raises
    ValueError naming the text; the host is not resolved or checked here.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    number = int(port)
    low = 0 if allow_port_zero else 1
    if not low <= number <= 65535:
        raise ValueError(f"port out of range ({low}-65535) in {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        if default_host is None:
            raise ValueError(f"expected HOST:PORT, got {text!r} (no host)")
        host = default_host
    if any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"invalid host in {text!r}")
    return host, number
