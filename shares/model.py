"""Share definitions: pure dataclasses and the validation that guards them.

A `Share` names a directory inside a volume and says who may reach it over
which protocol. A `ShareTable` is every share plus where each volume is
mounted: it is the whole input of the renderers, so rendering is a pure
function of it. Nothing in this module touches a server; `validate()` and
`resolved()` only read the file system to resolve symlinks (a path that
escapes its volume through a symlink is rejected like one that escapes with
'..'). Whoever writes a config file renders `table.resolved()`, taken just
before the write: a share user may swap a directory for a symlink at any
time after validation, so the check is repeated where the path is rendered,
and the real directory, not the symlink, goes into the config.

Every string that ends up in smb.conf or ganesha.conf is checked against a
narrow character set here, so the renderers never need to escape anything:
a name with a newline, bracket, quote, '=', ';', '#', '%' or a '..'
component cannot reach a config file.
"""
from __future__ import annotations

import enum
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from opie.shares.errors import ValidationErrors

log = logging.getLogger(__name__)

SHARE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VOLUME_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Debian's NAME_REGEX, without the trailing '$' machine accounts.
ACCOUNT_NAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
PATH_COMPONENT_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}")
ABS_PATH_RE = re.compile(r"(/[A-Za-z0-9._+-]+)+/?")
COMMENT_RE = re.compile(r"[A-Za-z0-9 ._,:()/+-]{0,80}")
RESERVED_SHARE_NAMES = frozenset({"global", "homes", "printers", "print$", "ipc$"})
MAX_EXPORT_ID = 65535  # Ganesha's Export_Id is a uint16; 0 is the pseudo root.


class Protocol(str, enum.Enum):
    """Which servers publish a share."""

    SMB = "smb"
    NFS = "nfs"
    BOTH = "both"

    def includes(self, protocol: "Protocol") -> bool:
        return self is protocol or self is Protocol.BOTH


@dataclass(frozen=True)
class Share:
    """One share: a directory `path` inside `volume`, published over `protocol`.

    SMB: `users` and `groups` are the only accounts allowed in (both empty:
    any account in Samba's passdb); guests only with `guest_ok`.
    NFS: only clients inside `networks` may mount; `root_squash` maps a
    client's root to the anonymous user. `export_id` is Ganesha's Export_Id,
    stable for the life of the share (see `ShareTable.with_share`).
    `previous_versions` turns on shadow_copy2 over the volume's snapshots.
    """

    name: str
    volume: str
    path: str = ""
    protocol: Protocol = Protocol.SMB
    read_only: bool = False
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    guest_ok: bool = False
    networks: tuple[str, ...] = ()
    root_squash: bool = True
    export_id: int | None = None
    previous_versions: bool = False
    comment: str = ""

    @property
    def smb(self) -> bool:
        return self.protocol.includes(Protocol.SMB)

    @property
    def nfs(self) -> bool:
        return self.protocol.includes(Protocol.NFS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "volume": self.volume, "path": self.path,
            "protocol": self.protocol.value, "read_only": self.read_only,
            "users": list(self.users), "groups": list(self.groups),
            "guest_ok": self.guest_ok, "networks": list(self.networks),
            "root_squash": self.root_squash, "export_id": self.export_id,
            "previous_versions": self.previous_versions, "comment": self.comment,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Share":
        """Build a share from a config-file mapping; raises ValidationErrors on wrong types."""
        errors = ValidationErrors()
        unknown = set(data) - set(cls.__dataclass_fields__)
        for key in sorted(unknown):
            errors.add(str(key), "unknown field")
        for key in ("name", "volume"):
            if not isinstance(data.get(key), str):
                errors.add(key, "required, a string")
        try:
            protocol = Protocol(data.get("protocol", "smb"))
        except ValueError:
            errors.add("protocol", "must be one of smb, nfs, both")
            protocol = Protocol.SMB
        lists = {}
        for key in ("users", "groups", "networks"):
            value = data.get(key, [])
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                errors.add(key, "must be a list of strings")
                value = []
            lists[key] = tuple(value)
        flags = {}
        for key, default in (("read_only", False), ("guest_ok", False),
                             ("root_squash", True), ("previous_versions", False)):
            value = data.get(key, default)
            if not isinstance(value, bool):
                errors.add(key, "must be true or false")
                value = default
            flags[key] = value
        export_id = data.get("export_id")
        if export_id is not None and (type(export_id) is not int):
            errors.add("export_id", "must be an integer")
            export_id = None
        for key in ("path", "comment"):
            if not isinstance(data.get(key, ""), str):
                errors.add(key, "must be a string")
        errors.check()
        return cls(name=data["name"], volume=data["volume"], path=data.get("path", ""),
                   protocol=protocol, export_id=export_id, comment=data.get("comment", ""),
                   **lists, **flags)


def _printable(name: Any) -> str:
    """`name` as it may appear in an error message: itself if valid, else its repr (one line)."""
    return name if isinstance(name, str) and SHARE_NAME_RE.fullmatch(name) else repr(name)


def _check_account(errors: ValidationErrors, field_name: str, value: str, what: str) -> None:
    if not ACCOUNT_NAME_RE.fullmatch(value):
        errors.add(field_name, f"{value!r} is not a valid {what} name "
                   "(lower-case letters, digits, '_' and '-', starting with a letter or '_', "
                   "at most 32)")


def check_account_name(name: str, field_name: str = "user") -> None:
    """Raise ValidationErrors unless `name` is a system-safe user or group name."""
    errors = ValidationErrors()
    _check_account(errors, field_name, name, field_name)
    errors.check()


def check_volume_root(name: str, mountpoint: str, errors: ValidationErrors) -> None:
    """Add errors for a volume name or mountpoint that could not go into a config file."""
    if not VOLUME_NAME_RE.fullmatch(name):
        errors.add(f"volumes.{name}", "volume names are letters, digits, '.', '_' and '-'")
    if not isinstance(mountpoint, str) or not ABS_PATH_RE.fullmatch(mountpoint) or \
            any(part == ".." for part in mountpoint.split("/")):
        errors.add(f"volumes.{name}", f"mountpoint {mountpoint!r} must be an absolute path of "
                   "letters, digits, '.', '_', '+' and '-' without '..'")


def resolve_directory(mountpoint: str, parts: list[str]) -> tuple[str, str]:
    """(real volume root, real directory) of `parts` below `mountpoint`, symlinks resolved now."""
    root = os.path.realpath(mountpoint)
    return root, os.path.realpath(os.path.join(root, *parts))


def inside(root: str, target: str) -> bool:
    return target == root or target.startswith(root + os.sep)


def share_errors(share: Share, volumes: Mapping[str, str]) -> ValidationErrors:
    """All problems of one share on its own, by field (empty when valid)."""
    errors = ValidationErrors()
    if not isinstance(share.name, str) or not SHARE_NAME_RE.fullmatch(share.name):
        errors.add("name", f"{share.name!r} is not a valid share name (letters, digits, '.', "
                   "'_' and '-', starting with a letter or digit, at most 64)")
    elif share.name.lower() in RESERVED_SHARE_NAMES:
        errors.add("name", f"{share.name!r} is reserved by Samba")
    if share.volume not in volumes:
        errors.add("volume", f"unknown volume {share.volume!r}")
    parts = [p for p in share.path.split("/") if p] if isinstance(share.path, str) else [".."]
    if share.path.startswith("/"):
        errors.add("path", "must be relative to the volume, not absolute")
    elif any(p == ".." for p in parts):
        errors.add("path", "must not leave the volume ('..')")
    elif not all(PATH_COMPONENT_RE.fullmatch(p) for p in parts) or "\n" in share.path:
        errors.add("path", f"{share.path!r}: path components are letters, digits, '.', '_', "
                   "'+' and '-', not starting with '.'")
    elif share.volume in volumes:
        root, target = resolve_directory(volumes[share.volume], parts)
        if not inside(root, target):
            errors.add("path", f"{share.path!r} resolves to {target}, outside volume "
                       f"{share.volume!r}")
    for user in share.users:
        _check_account(errors, "users", user, "user")
    for group in share.groups:
        _check_account(errors, "groups", group, "group")
    if not share.smb and (share.users or share.groups or share.guest_ok):
        errors.add("users", "users, groups and guest access apply to SMB shares only")
    for net in share.networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            errors.add("networks", f"{net!r} is not an IP network (like 192.168.1.0/24)")
    if share.nfs and not share.networks:
        errors.add("networks", "an NFS share needs at least one allowed client network")
    if not share.nfs and share.networks:
        errors.add("networks", "client networks apply to NFS shares only")
    if share.export_id is not None and not 1 <= share.export_id <= MAX_EXPORT_ID:
        errors.add("export_id", f"must be between 1 and {MAX_EXPORT_ID}")
    if not isinstance(share.comment, str) or not COMMENT_RE.fullmatch(share.comment):
        errors.add("comment", "at most 80 of letters, digits, spaces and . _ , : ( ) / + -")
    return errors


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


@dataclass(frozen=True)
class ShareTable:
    """Every share plus the mountpoint of every volume: the input of `render`.

    Immutable; `with_share` / `without_share` return new tables and leave
    validation to `validate()`, which the service calls before it changes
    anything.
    """

    volumes: Mapping[str, str] = field(default_factory=dict)
    shares: tuple[Share, ...] = ()

    def get(self, name: str) -> Share | None:
        for share in self.shares:
            if share.name.lower() == name.lower():
                return share
        return None

    def directory(self, share: Share) -> Path:
        """The absolute directory served for `share` (valid table assumed)."""
        return Path(self.volumes[share.volume], *_parts(share.path))

    def smb_shares(self) -> list[Share]:
        return sorted((s for s in self.shares if s.smb), key=lambda s: s.name.lower())

    def nfs_shares(self) -> list[Share]:
        return sorted((s for s in self.shares if s.nfs), key=lambda s: s.export_id or 0)

    def with_share(self, share: Share) -> "ShareTable":
        """A table with `share` added (or replacing the share of the same name).

        An NFS share without an export id gets the one of the share it
        replaces, else the lowest id no other share uses.
        """
        old = self.get(share.name)
        others = tuple(s for s in self.shares if s is not old)
        if share.nfs and share.export_id is None:
            if old is not None and old.export_id is not None:
                share = replace(share, export_id=old.export_id)
            else:
                used = {s.export_id for s in others}
                share = replace(share, export_id=next(i for i in range(1, MAX_EXPORT_ID + 2)
                                                      if i not in used))
        return ShareTable(dict(self.volumes), others + (share,))

    def without_share(self, name: str) -> "ShareTable":
        old = self.get(name)
        if old is None:
            raise ValidationErrors([("name", f"no share named {name!r}")])
        return ShareTable(dict(self.volumes), tuple(s for s in self.shares if s is not old))

    def errors(self) -> ValidationErrors:
        """Every problem of the table, by field, prefixed 'shares.NAME.'."""
        errors = ValidationErrors()
        for name, mountpoint in self.volumes.items():
            check_volume_root(name, mountpoint, errors)
        seen: dict[str, str] = {}
        ids: dict[int, str] = {}
        for share in self.shares:
            prefix = f"shares.{_printable(share.name)}."
            errors.extend(share_errors(share, self.volumes), prefix)
            key = share.name.lower() if isinstance(share.name, str) else ""
            if key in seen:
                errors.add(prefix + "name", f"duplicates share {seen[key]!r}")
            seen[key] = share.name
            if share.nfs:
                if share.export_id is None:
                    errors.add(prefix + "export_id", "an NFS share needs an export id")
                elif share.export_id in ids:
                    errors.add(prefix + "export_id",
                               f"{share.export_id} is used by share {ids[share.export_id]!r}")
                else:
                    ids[share.export_id] = share.name
        return errors

    def validate(self) -> "ShareTable":
        """Return self, or raise ValidationErrors listing every problem by field."""
        self.errors().check()
        return self

    def resolved(self) -> "ShareTable":
        """This table with every mountpoint and share path resolved as the file system is now.

        Call it right before rendering a config file, and render what it returns.
        Raises ValidationErrors ('shares.NAME.path') for a share whose directory
        now resolves outside its volume, or for any other problem of the table.
        """
        self.validate()
        volumes = {name: os.path.realpath(mp) for name, mp in self.volumes.items()}
        errors = ValidationErrors()
        shares = []
        for share in self.shares:
            root, target = resolve_directory(volumes[share.volume], _parts(share.path))
            if not inside(root, target):
                log.error("share %s: %s now resolves outside volume %s; not rendered",
                          share.name, share.path, share.volume)
                errors.add(f"shares.{share.name}.path", f"{share.path!r} now resolves outside "
                           f"volume {share.volume!r} (a symlink?); the share is not served there")
                continue
            shares.append(replace(share, path=os.path.relpath(target, root) if target != root else ""))
        errors.check()
        return ShareTable(volumes, tuple(shares)).validate()

    def to_dict(self) -> dict[str, Any]:
        return {"volumes": dict(self.volumes), "shares": [s.to_dict() for s in self.shares]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShareTable":
        """Parse a config mapping; raises ValidationErrors for malformed entries."""
        errors = ValidationErrors()
        volumes = data.get("volumes", {})
        if not isinstance(volumes, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in volumes.items()):
            errors.add("volumes", "must map volume names to mountpoints")
            volumes = {}
        raw: Iterable[Any] = data.get("shares", [])
        if not isinstance(raw, list):
            errors.add("shares", "must be a list")
            raw = []
        shares = []
        for index, item in enumerate(raw):
            if not isinstance(item, dict):
                errors.add(f"shares[{index}]", "must be a mapping")
                continue
            try:
                shares.append(Share.from_dict(item))
            except ValidationErrors as exc:
                errors.extend(exc, f"shares[{index}].")
        errors.check()
        return cls(dict(volumes), tuple(shares))
