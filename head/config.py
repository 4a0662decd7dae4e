"""The head's configuration: `head.json` in its state dir.

Layout (JSON object, written atomically: temp file, fsync, rename):
    {"magic": "opie-head", "version": 1, "name": "head0", "role": "active",
     "members": ["nbds://HOST:PORT/EXPORT", ...],   # RAID5 members, any order
     "tls_dir": DIR,                # ca-cert.pem + server/client certificates of this head
     "nbd_listen": "127.0.0.1:0",   # the head's own NBD exports (volumes, snapshots)
     "api_listen": "127.0.0.1:0",   # REST API for the CLI and GUI
     "create_array": false,         # create the array if no member holds one
     "assume_clean": false,         # only for members known to be all zeros (fresh sparse files)
     "chunk_size": 65536, "rebuild_rate": null,
     "member_io_thread": false,     # member NBD clients on their own thread (head/members.py)
     "mount_root": DIR,             # volumes mount below here (a shared bind mount)
     "volumes": [{"name": "vol0", "size": BYTES, "mountpoint": DIR|null}],
     "backups": [{"volume": "vol0", "to": TARGET, "every": SECONDS, "keep_snapshot": false}],
     "shares": {...},               # owned by shares/
     # discovery (head/cluster.py); all optional, off by default:
     "discover": false,             # find ISUs by zeroconf; with members [] the array's members too
     "cluster_id": "",              # this cluster's id (ISUs of another id are foreign)
     "discover_address": null,      # IPv4 address to browse and heartbeat on (default: api_listen's)
     "discover_members": 0,         # members to wait for before creating the array
     "discover_timeout": 120.0,     # bound on that wait at boot
     "lease_pool": null,            # "A.B.C.D-E" or CIDR: run the lease server with this pool
     "lease_interface": "eth0", "lease_prefixlen": 24, "lease_secs": 3600,
     "lease_token_file": null,      # cluster token (hex) that signs lease messages
     "isus": [{"uuid": U, "role": "member"|"spare", "exports": [NAME]}],   # adopted ISUs
     "insecure": false,             # allow plain listeners on network addresses (below)
     "ha": null}                    # active/passive heads (HAConfig below); null: a single head

The `ha` section (off by default: without it the head is the single active
head it always was):
    {"etcd": ["https://HOST:2379", ...],   # the cluster's etcd members (TLS with tls_dir's certificate)
     "cluster": "opie",                    # keys live under /opie/CLUSTER/
     "lease_ttl": 2,                       # the leader lease, seconds (1..10)
     "service_address": "A.B.C.D"|null,    # the /32 that moves with the active role ...
     "service_interface": "eth0"|null,     # ... on this interface (both or neither)
     "client_ports": [445, 2049],          # client connections on these ports are published and reset
     "mirror_listen": "HOST:PORT"|null,    # the passive's mapping-table mirror receiver
     "mirror_peer": "HOST:PORT"|null,      # the other head's receiver, fed while active
     "control": {"MEMBER URI": "HOST:PORT"}}   # an ISU's control channel, if not HOST:7869 of its URI
It needs `tls_dir` (a certificate of role head from the cluster CA: etcd,
the ISUs' control channel and the mirror all check it).

Plain listeners: the API is plain HTTP, and the NBD exports are plain
without tls_dir. On a network address (not loopback) either is refused
unless `insecure` is true; the head then logs a WARNING at start.

`load` validates every field and raises `ConfigError` naming the field; the
file on disk is never changed by a failed validation.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from opie.fileio import atomic_write
from opie.nbd import tls
from opie.nbd import uri as nbd_uri
from opie.netaddr import parse_host_port

log = logging.getLogger(__name__)

MAGIC = "opie-head"
VERSION = 1
FILENAME = "head.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


# Fields whose JSON type validate() checks first: integers with their range,
# positive numbers (those in _OPTIONAL may be null) and flags.
_INTS = {"chunk_size": (4096, 1 << 30), "discover_members": (0, 64), "lease_prefixlen": (0, 32),
         "lease_secs": (1, 1 << 31)}
_POSITIVE = ("rebuild_rate", "discover_timeout")
_OPTIONAL = ("rebuild_rate",)
_FLAGS = ("create_array", "assume_clean", "member_io_thread", "discover")


class ConfigError(ValueError):
    """The head configuration is invalid; nothing was changed."""


@dataclass
class VolumeSpec:
    name: str
    size: int
    mountpoint: str | None = None


@dataclass
class BackupSpec:
    volume: str
    to: str
    every: int  # seconds between scheduled runs
    keep_snapshot: bool = False


_HA_KEYS = ("etcd", "cluster", "lease_ttl", "service_address", "service_interface", "client_ports",
            "mirror_listen", "mirror_peer", "control")


def _ha_address(key: str, value: Any) -> None:
    if value is None:
        return
    try:
        parse_host_port(value)
    except ValueError as exc:
        raise ConfigError(f"ha.{key}: {exc}") from None


@dataclass
class HAConfig:
    """The `ha` section (see the module docstring). Build it with `from_dict`."""

    etcd: list[str]
    cluster: str
    lease_ttl: int = 2
    service_address: str | None = None
    service_interface: str | None = None
    client_ports: list[int] = field(default_factory=list)
    mirror_listen: str | None = None
    mirror_peer: str | None = None
    control: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, obj: Any) -> "HAConfig":
        """Validated; ConfigError naming the field (`ha.FIELD: ...`) otherwise."""
        if not isinstance(obj, dict):
            raise ConfigError(f"ha: expected an object, got {obj!r}")
        unknown = sorted(set(obj) - set(_HA_KEYS))
        if unknown:
            raise ConfigError(f"ha.{unknown[0]}: unknown field (known: {', '.join(_HA_KEYS)})")
        for key in ("etcd", "cluster"):
            if key not in obj:
                raise ConfigError(f"ha.{key}: required")
        return cls(**obj).validate()

    def validate(self) -> "HAConfig":
        if not isinstance(self.etcd, list) or not self.etcd:
            raise ConfigError(f"ha.etcd: expected a list of https://HOST:PORT endpoints, got {self.etcd!r}")
        for url in self.etcd:
            if not isinstance(url, str) or not re.fullmatch(r"https://[^\s/]+:\d{1,5}", url):
                raise ConfigError(f"ha.etcd: expected https://HOST:PORT, got {url!r}")
        if not isinstance(self.cluster, str) or not NAME.fullmatch(self.cluster):
            raise ConfigError(f"ha.cluster: {self.cluster!r} must be 1-32 of [A-Za-z0-9_-]")
        if type(self.lease_ttl) is not int or not 1 <= self.lease_ttl <= 10:
            raise ConfigError(f"ha.lease_ttl: expected an integer 1..10 (seconds), got {self.lease_ttl!r}")
        if (self.service_address is None) != (self.service_interface is None):
            raise ConfigError("ha.service_interface: service_address and service_interface go together")
        if self.service_address is not None:
            try:
                ipaddress.IPv4Address(self.service_address)
            except ValueError:
                raise ConfigError(f"ha.service_address: expected an IPv4 address, "
                                  f"got {self.service_address!r}") from None
            if not isinstance(self.service_interface, str) or not self.service_interface:
                raise ConfigError(f"ha.service_interface: expected an interface name, "
                                  f"got {self.service_interface!r}")
        if not isinstance(self.client_ports, list) or \
                any(type(p) is not int or not 1 <= p <= 65535 for p in self.client_ports):
            raise ConfigError(f"ha.client_ports: expected a list of ports 1..65535, got {self.client_ports!r}")
        _ha_address("mirror_listen", self.mirror_listen)
        _ha_address("mirror_peer", self.mirror_peer)
        if not isinstance(self.control, dict):
            raise ConfigError(f"ha.control: expected {{member URI: HOST:PORT}}, got {self.control!r}")
        for member, address in self.control.items():
            _ha_address(f"control[{member}]", address)
        return self


@dataclass
class HeadConfig:
    members: list[str]
    tls_dir: str | None
    mount_root: str
    name: str = "head0"
    role: str = "active"
    nbd_listen: str = "127.0.0.1:0"
    api_listen: str = "127.0.0.1:0"
    create_array: bool = False
    assume_clean: bool = False  # members known to be all zeros: skip the initial parity pass
    chunk_size: int = 64 * 1024
    rebuild_rate: float | None = None
    member_io_thread: bool = False  # member clients on a thread of their own (head/members.py)
    volumes: list[VolumeSpec] = field(default_factory=list)
    backups: list[BackupSpec] = field(default_factory=list)
    shares: dict[str, Any] = field(default_factory=dict)
    discover: bool = False
    cluster_id: str = ""
    discover_address: str | None = None
    discover_members: int = 0
    discover_timeout: float = 120.0
    lease_pool: str | None = None
    lease_interface: str = "eth0"
    lease_prefixlen: int = 24
    lease_secs: int = 3600
    lease_token_file: str | None = None
    isus: list[dict[str, Any]] = field(default_factory=list)
    insecure: bool = False
    ha: HAConfig | None = None

    def plain_network_listeners(self) -> list[tuple[str, str]]:
        """(field, host) of each listener that would serve without TLS on a network
        address: api_listen (plain HTTP), nbd_listen without tls_dir. An empty host
        means loopback (the daemon listens on 127.0.0.1 then)."""
        listeners = [("api_listen", self.api_listen)] + ([] if self.tls_dir else [("nbd_listen", self.nbd_listen)])
        hosts = [(name, parse_host_port(addr, default_host="127.0.0.1", allow_port_zero=True)[0])
                 for name, addr in listeners]
        return [(name, host) for name, host in hosts if not tls.is_loopback(host)]

    def validate(self) -> "HeadConfig":
        """Return self, or raise ConfigError naming the first bad field."""
        self._validate_types()
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} must be 1-32 of [A-Za-z0-9_-]")
        if self.role not in ("active", "passive"):
            raise ConfigError(f"role: expected 'active' or 'passive', got {self.role!r}")
        if len(self.members) < 2 and not (self.discover and not self.members):
            raise ConfigError(f"members: RAID5 needs at least 2, got {len(self.members)}")
        self._validate_discovery()
        for key in ("nbd_listen", "api_listen"):
            try:
                parse_host_port(getattr(self, key), default_host="127.0.0.1", allow_port_zero=True)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        if not isinstance(self.insecure, bool):
            raise ConfigError(f"insecure: expected true or false, got {self.insecure!r}")
        for name, host in self.plain_network_listeners():
            if not self.insecure:
                raise ConfigError(f"{name}: {getattr(self, name)} would serve without TLS on a network "
                                  f"address; listen on loopback, or set \"insecure\": true to allow it anyway")
        for m in self.members:
            try:
                u = nbd_uri.parse(m)
            except ValueError as exc:
                raise ConfigError(f"members: {exc}") from None
            if u.tls and not self.tls_dir:
                raise ConfigError(f"members: {m} needs TLS but tls_dir is not set")
        if len(set(self.members)) != len(self.members):
            raise ConfigError("members: the same export is listed twice")
        if self.ha is not None:
            if not isinstance(self.ha, HAConfig):
                raise ConfigError(f"ha: expected an object, got {self.ha!r}")
            self.ha.validate()
            if not self.tls_dir:
                raise ConfigError("ha: needs tls_dir (a certificate of role head from the cluster CA "
                                  "for etcd, the ISUs' control channel and the mirror)")
            unknown = sorted(set(self.ha.control) - set(self.members))
            if unknown:
                raise ConfigError(f"ha.control: {unknown[0]} is not one of the members")
        if self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"chunk_size: expected a power of two, got {self.chunk_size}")
        names = set()
        for v in self.volumes:
            if not NAME.fullmatch(v.name):
                raise ConfigError(f"volumes: name {v.name!r} must be 1-32 of [A-Za-z0-9_-]")
            if v.name in names:
                raise ConfigError(f"volumes: {v.name} listed twice")
            names.add(v.name)
            if not isinstance(v.size, int) or v.size <= 0:
                raise ConfigError(f"volumes: {v.name}: size must be a positive number of bytes")
        for b in self.backups:
            if b.volume not in names:
                raise ConfigError(f"backups: unknown volume {b.volume!r}")
            if not isinstance(b.every, int) or b.every < 10:
                raise ConfigError(f"backups: {b.volume}: 'every' must be at least 10 seconds")
        return self

    def _validate_types(self) -> None:
        """Numbers and flags of the wrong JSON type (a string, a float, null) are refused by name,
        before any comparison could raise TypeError."""
        for name, (lo, hi) in _INTS.items():
            value = getattr(self, name)
            if type(value) is not int or not lo <= value <= hi:
                raise ConfigError(f"{name}: expected an integer {lo}..{hi}, got {value!r}")
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if type(value) not in (int, float) or not value > 0:
                raise ConfigError(f"{name}: expected a positive number, got {value!r}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")

    def _validate_discovery(self) -> None:
        if not self.discover:
            return
        if not self.cluster_id or not self.cluster_id.isprintable() or " " in self.cluster_id \
                or len(self.cluster_id) > 64:
            raise ConfigError(f"cluster_id: discovery needs 1-64 printable characters, got {self.cluster_id!r}")
        if self.lease_pool is not None and not self.lease_token_file:
            raise ConfigError("lease_token_file: the lease server needs the cluster token")
        seen = set()
        for i in self.isus:
            if not isinstance(i, dict) or i.get("role") not in ("member", "spare") \
                    or not isinstance(i.get("uuid"), str) or not isinstance(i.get("exports", []), list):
                raise ConfigError(f"isus: expected {{uuid, role: member|spare, exports}}, got {i!r}")
            if i["uuid"] in seen:
                raise ConfigError(f"isus: {i['uuid']} listed twice")
            seen.add(i["uuid"])

    def mountpoint(self, volume: str) -> str:
        for v in self.volumes:
            if v.name == volume and v.mountpoint:
                return v.mountpoint
        return os.path.join(self.mount_root, volume)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        if getattr(self, "discovered_members", False):  # found at boot (head/cluster.py): never written back
            body["members"] = []
        return {"magic": MAGIC, "version": VERSION, **body}


def from_json(obj: Any) -> HeadConfig:
    if not isinstance(obj, dict):
        raise ConfigError("expected a JSON object")
    if obj.get("magic") != MAGIC:
        raise ConfigError(f"magic: expected {MAGIC!r}, got {obj.get('magic')!r}")
    if obj.get("version") != VERSION:
        raise ConfigError(f"version: expected {VERSION}, got {obj.get('version')!r}")
    body = {k: v for k, v in obj.items() if k not in ("magic", "version")}
    try:
        body["volumes"] = [VolumeSpec(**v) for v in body.get("volumes", [])]
        body["backups"] = [BackupSpec(**b) for b in body.get("backups", [])]
        if body.get("ha") is not None:
            body["ha"] = HAConfig.from_dict(body["ha"])
        cfg = HeadConfig(**body)
    except TypeError as exc:
        raise ConfigError(f"unexpected or missing field: {exc}") from None
    return cfg.validate()


def load(state_dir: str | os.PathLike) -> HeadConfig:
    path = Path(state_dir) / FILENAME
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no head configuration") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    try:
        return from_json(obj)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save(state_dir: str | os.PathLike, cfg: HeadConfig) -> None:
    cfg.validate()
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / FILENAME, json.dumps(cfg.to_json(), indent=2) + "\n")
