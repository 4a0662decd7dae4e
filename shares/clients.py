"""Command lines of the real clients (smbclient, libnfs-utils) for a share.

Used by tests, benchmarks and the lab to reach shares the way an admin
would, and to print how to connect. No kernel client exists on the lab
hosts, so these are the only clients.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from opie.netaddr import parse_host_port
from opie.shares.model import ShareTable

log = logging.getLogger(__name__)


def smb_url(host: str, port: int, share: str) -> str:
    return f"smb://{host}:{port}/{share}"


def nfs_url(host: str, port: int | None, path: str, version: int = 4) -> str:
    """libnfs URL of `path` ('/share/file'); `port=None` asks rpcbind (NFSv3)."""
    query = f"version={version}" + (f"&nfsport={port}" if port is not None else "")
    return f"nfs://{host}/{path.lstrip('/')}?{query}"


def smbclient_argv(host: str, port: int, share: str, user: str | None, password: str | None,
                   commands: str | None = None) -> list[str]:
    """argv for smbclient on //host/share; `user=None` connects as guest (-N)."""
    argv = ["smbclient", f"//{host}/{share}", "-p", str(port)]
    argv += ["-U", f"{user}%{password}"] if user is not None else ["-N"]
    if commands is not None:
        argv += ["-c", commands]
    return argv


def smbclient(host: str, port: int, share: str, user: str | None, password: str | None,
              commands: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run smbclient commands (';'-separated); returns the finished process, never raises on rc."""
    return subprocess.run(smbclient_argv(host, port, share, user, password, commands),
                          capture_output=True, text=True, timeout=timeout)


def nfs_cmd(tool: str, args: Sequence[str], netns: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a libnfs-utils tool (nfs-cat, nfs-cp, nfs-ls), optionally in a network namespace."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(prefix + [tool, *args], capture_output=True, text=True,
                          timeout=timeout)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks; how a client checks a copy."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_random(path: Path, size: int) -> Path:
    """Fill `path` with `size` random bytes (incompressible, not deduplicable)."""
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(size % (1 << 20)))
    return path


@contextmanager
def scratch_volume(prefix: str = "opie-shares-") -> Iterator[Path]:
    """A directory under /tmp, mode 0755, standing in for a mounted volume; removed after.

    Share users (and NFS's squashed anonymous user) must be able to traverse
    every parent, which pytest's 0700 tmp dirs do not allow.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def describe(table: ShareTable, host: str, smb_port: int | None, nfs_port: int | None,
             user: str | None = None, password: str | None = None) -> list[dict[str, Any]]:
    """lab.json `shares` entries: one {name, protocol, url, user, password} per share and protocol.

    URLs are `smb://HOST:PORT/SHARE` and `nfs://HOST:PORT/SHARE` (NFS has no
    user; its entry carries None). A protocol whose port is None is skipped.
    """
    out: list[dict[str, Any]] = []
    for share in sorted(table.shares, key=lambda s: s.name.lower()):
        if share.smb and smb_port is not None:
            out.append({"name": share.name, "protocol": "smb",
                        "url": smb_url(host, smb_port, share.name),
                        "user": user, "password": password})
        if share.nfs and nfs_port is not None:
            out.append({"name": share.name, "protocol": "nfs",
                        "url": f"nfs://{host}:{nfs_port}/{share.name}",
                        "user": None, "password": None})
    return out


def how_to_connect(entry: Mapping[str, Any]) -> str:
    """One line an admin can paste to reach a share described by `describe`."""
    url = str(entry["url"])
    host_port, _, name = url.split("://", 1)[1].partition("/")
    host, port = parse_host_port(host_port)
    if entry["protocol"] == "smb":
        return " ".join(smbclient_argv(host, port, name, entry.get("user"),
                                       entry.get("password")))
    return f"nfs-ls '{nfs_url(host, port, '/' + name, 4)}'"
