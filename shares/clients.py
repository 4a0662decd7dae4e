"""Command lines of the real clients (smbclient, libnfs-utils) for a share.

Used by tests, benchmarks and the lab to reach shares the way an admin
would, and to print how to connect. No kernel client exists on the lab
hosts, so these are the only clients.
"""
from __future__ import annotations

import logging
import subprocess
from typing import Sequence

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
