"""SMB shares: smb.conf for Samba's smbd, rendered as a pure function.

Everything smbd writes lives under `SmbSettings.state_dir` (private, lock,
state, cache, pid and ncalrpc dirs, and the tdbsam passdb), so several
smbds can run on one host on different ports. "Previous Versions" uses
shadow_copy2 with snapshots of the whole volume mounted read-only at
`<volume mountpoint>/<snapdir>/@GMT-YYYY.MM.DD-HH.MM.SS` (see
`shares.snapshots`); every share on that volume sees them. The server's
lifecycle and the registry entry (`SmbKind`) live in `shares.smbd`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from opie.shares.base import check_endpoint
from opie.shares.errors import ValidationErrors
from opie.shares.model import PATH_COMPONENT_RE, Share, ShareTable
from opie.shares.snapshots import GMT_FORMAT

log = logging.getLogger(__name__)

STATE_SUBDIRS = ("private", "lock", "state", "cache", "run", "ncalrpc", "log")


@dataclass(frozen=True)
class SmbSettings:
    """Where and how smbd listens, and where it keeps its state."""

    state_dir: str
    port: int = 445
    bind_address: str = "127.0.0.1"
    netbios_name: str = "OPIE"
    workgroup: str = "WORKGROUP"
    snapdir: str = ".snapshots"
    log_level: int = 1

    @property
    def conf_path(self) -> Path:
        return Path(self.state_dir, "smb.conf")

    @property
    def pid_dir(self) -> Path:
        return Path(self.state_dir, "run")

    @property
    def passdb_path(self) -> Path:
        return Path(self.state_dir, "private", "passdb.tdb")

    def validate(self) -> "SmbSettings":
        errors = ValidationErrors()
        check_endpoint(errors, self.bind_address, self.port, self.state_dir)
        for key in ("netbios_name", "workgroup"):
            value = getattr(self, key)
            if not PATH_COMPONENT_RE.fullmatch(value) or len(value) > 15 or "." in value:
                errors.add(key, f"{value!r}: at most 15 letters, digits, '_' and '-'")
        if not re.fullmatch(r"[A-Za-z0-9._+-]{1,255}", self.snapdir) or self.snapdir in (".", ".."):
            errors.add("snapdir", f"{self.snapdir!r} must be one plain directory name")
        if not isinstance(self.log_level, int) or not 0 <= self.log_level <= 10:
            errors.add("log_level", "must be 0..10")
        errors.check()
        return self


def _section(name: str, options: list[tuple[str, str]]) -> str:
    lines = [f"[{name}]"]
    lines += [f"\t{key} = {value}" for key, value in options]
    return "\n".join(lines) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render_global(settings: SmbSettings, guests: bool) -> str:
    """The [global] section: private ports, dirs and passdb; no printers, no NetBIOS."""
    state = settings.state_dir
    return _section("global", [
        ("netbios name", settings.netbios_name),
        ("workgroup", settings.workgroup),
        ("server role", "standalone server"),
        ("security", "user"),
        ("smb ports", str(settings.port)),
        ("interfaces", settings.bind_address),
        ("bind interfaces only", "yes"),
        ("disable netbios", "yes"),
        ("server min protocol", "SMB2_02"),
        ("private dir", f"{state}/private"),
        ("lock directory", f"{state}/lock"),
        ("state directory", f"{state}/state"),
        ("cache directory", f"{state}/cache"),
        ("pid directory", f"{state}/run"),
        ("ncalrpc dir", f"{state}/ncalrpc"),
        ("passdb backend", f"tdbsam:{settings.passdb_path}"),
        ("log file", f"{state}/log/smbd.log"),
        ("log level", str(settings.log_level)),
        ("map to guest", "bad user" if guests else "never"),
        ("restrict anonymous", "0" if guests else "2"),
        ("usershare max shares", "0"),
        ("load printers", "no"),
        ("printing", "bsd"),
        ("printcap name", "/dev/null"),
        ("disable spoolss", "yes"),
    ])


def render_share(share: Share, table: ShareTable, settings: SmbSettings) -> str:
    """One share's section. `table` must be valid (names are not escaped)."""
    options = [
        ("path", str(table.directory(share))),
        ("read only", _yes(share.read_only)),
        ("guest ok", _yes(share.guest_ok)),
        ("browseable", "yes"),
    ]
    if share.comment:
        options.append(("comment", share.comment))
    allowed = list(share.users) + [f"@{g}" for g in share.groups]
    if allowed:
        options.append(("valid users", " ".join(allowed)))
    if share.previous_versions:
        options += [
            ("vfs objects", "shadow_copy2"),
            ("shadow:mountpoint", table.volumes[share.volume]),
            ("shadow:snapdir", settings.snapdir),
            ("shadow:format", GMT_FORMAT),
            ("shadow:localtime", "no"),
            ("shadow:sort", "desc"),
        ]
    return _section(share.name, options)


def render(table: ShareTable, settings: SmbSettings) -> str:
    """The whole smb.conf for the SMB shares of `table` (validated), sorted by name."""
    shares = table.smb_shares()
    parts = ["# Rendered by Opie (shares.smb); edits are overwritten.\n",
             render_global(settings, any(s.guest_ok for s in shares))]
    parts += [render_share(s, table, settings) for s in shares]
    return "\n".join(parts)
