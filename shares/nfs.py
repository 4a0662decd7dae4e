"""NFS exports: ganesha.conf for NFS-Ganesha, rendered as a pure function.

Each NFS share is one EXPORT block with a stable `Export_Id` (the share's
`export_id`) and the pseudo path `/<share name>`; with `Mount_Path_Pseudo`
NFSv3 clients mount the same `/<share name>`, so one URL form serves both
versions. Clients outside the share's networks get no access at all
(`Access_Type = None` outside the CLIENT block). NFSv3 needs rpcbind;
NFSv4 alone does not. NLM and RQUOTA are off. The server's lifecycle and
the registry entry (`NfsKind`) live in `shares.ganesha`.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from opie.shares.base import check_endpoint
from opie.shares.errors import ValidationErrors
from opie.shares.model import Share, ShareTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NfsSettings:
    """Where and how ganesha.nfsd listens and keeps its state.

    `bind_address=None` listens on every address (needed inside a network
    namespace with only `lo`, where Ganesha cannot resolve an address).
    `versions` (3, 4) needs an rpcbind reachable on the same host.
    """

    state_dir: str
    port: int = 2049
    bind_address: str | None = "127.0.0.1"
    versions: tuple[int, ...] = (4,)

    @property
    def conf_path(self) -> Path:
        return Path(self.state_dir, "ganesha.conf")

    @property
    def pid_path(self) -> Path:
        return Path(self.state_dir, "ganesha.pid")

    @property
    def log_path(self) -> Path:
        return Path(self.state_dir, "ganesha.log")

    def validate(self) -> "NfsSettings":
        errors = ValidationErrors()
        check_endpoint(errors, self.bind_address, self.port, self.state_dir)
        if not self.versions or not set(self.versions) <= {3, 4}:
            errors.add("versions", "a non-empty subset of 3 and 4")
        errors.check()
        return self


def _versions(settings: NfsSettings) -> str:
    return ", ".join(str(v) for v in sorted(set(settings.versions)))


def _block(name: str, lines: list[str], indent: str = "") -> list[str]:
    return [f"{indent}{name} {{"] + [f"{indent}\t{line}" for line in lines] + [f"{indent}}}"]


def _networks(share: Share) -> list[str]:
    nets = {str(ipaddress.ip_network(n, strict=False)) for n in share.networks}
    return sorted(nets)


def render_core(settings: NfsSettings) -> str:
    """NFS_CORE_PARAM and NFSv4 blocks: ports, protocols, graceless fs recovery."""
    core = [f"Protocols = {_versions(settings)};", f"NFS_Port = {settings.port};"]
    if settings.bind_address is not None:
        core.append(f"Bind_Addr = {settings.bind_address};")
    core += ["Mount_Path_Pseudo = true;", "Enable_NLM = false;", "Enable_RQUOTA = false;"]
    v4 = ["Graceless = true;", "RecoveryBackend = fs;",
          f'RecoveryRoot = "{settings.state_dir}/recovery";']
    return "\n".join(_block("NFS_CORE_PARAM", core) + _block("NFSv4", v4)) + "\n"


def render_export(share: Share, table: ShareTable, settings: NfsSettings) -> str:
    """One share's EXPORT block. `table` must be valid (values are not escaped)."""
    squash = "Root_Squash" if share.root_squash else "No_Root_Squash"
    client = [
        f"Clients = {', '.join(_networks(share))};",
        f"Access_Type = {'RO' if share.read_only else 'RW'};",
        f"Squash = {squash};",
    ]
    lines = [
        f"Export_Id = {share.export_id};",
        f'Path = "{table.directory(share)}";',
        f'Pseudo = "/{share.name}";',
        f"Protocols = {_versions(settings)};",
        "Transports = TCP;",
        "SecType = sys;",
        "Access_Type = None;",
        f"Squash = {squash};",
    ]
    lines += _block("FSAL", ["Name = VFS;"]) + _block("CLIENT", client)
    return "\n".join(_block("EXPORT", lines)) + "\n"


def render(table: ShareTable, settings: NfsSettings) -> str:
    """The whole ganesha.conf for the NFS shares of `table` (validated), by export id."""
    parts = ["# Rendered by Opie (shares.nfs); edits are overwritten.\n", render_core(settings)]
    parts += [render_export(s, table, settings) for s in table.nfs_shares()]
    return "\n".join(parts)
