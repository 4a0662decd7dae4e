"""What an ISU announces, as data: `IsuRecord`, its TXT codec and the head's classification.

Pure (no sockets). TXT keys of `_opie-isu._tcp.local.`::

    uuid      ISU UUID
    name      admin-given name ("" if none)
    state     agent state, e.g. "ready", "degraded", "unconfigured"
    disks     number of disks the ISU exports
    capacity  total bytes over those disks
    version   ISU software version
    gen       config generation (increments on every config change)
    cluster   cluster id the ISU belongs to ("" = unassigned)
    role      "member", "spare" or "" within that cluster
    hb        UDP port of the ISU's heartbeat responder

`from_txt` fails only with `BadAnnouncement`.
"""
from __future__ import annotations

import enum
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass

SERVICE_TYPE = "_opie-isu._tcp.local."
TXT_VALUE_MAX = 200
ROLES = ("", "member", "spare")


class BadAnnouncement(ValueError):
    """TXT records that do not describe an ISU; the head ignores the service."""


class IsuClass(enum.Enum):
    NEW = "new"            # not assigned to any cluster (or no role in ours): can be adopted
    MEMBER = "member"      # a member of our array
    SPARE = "spare"        # a hot spare of our cluster
    FOREIGN = "foreign"    # belongs to another cluster: never touch


@dataclass(frozen=True)
class IsuRecord:
    uuid: str
    address: str
    port: int
    hb_port: int
    state: str = "ready"
    disks: int = 0
    capacity: int = 0
    version: str = ""
    config_gen: int = 0
    cluster: str = ""
    role: str = ""
    name: str = ""

    @property
    def service_name(self) -> str:
        return f"isu-{self.uuid}.{SERVICE_TYPE}"

    def to_txt(self) -> dict[str, str]:
        return {"uuid": self.uuid, "name": self.name, "state": self.state, "disks": str(self.disks),
                "capacity": str(self.capacity), "version": self.version, "gen": str(self.config_gen),
                "cluster": self.cluster, "role": self.role, "hb": str(self.hb_port)}


def _text(props: Mapping[bytes, bytes | None], key: str) -> str:
    raw = props.get(key.encode())
    if raw is None:
        raise BadAnnouncement(f"expected TXT key {key!r}")
    if len(raw) > TXT_VALUE_MAX:
        raise BadAnnouncement(f"TXT {key!r}: expected at most {TXT_VALUE_MAX} bytes, got {len(raw)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadAnnouncement(f"TXT {key!r}: expected UTF-8") from None
    if not text.isprintable():
        raise BadAnnouncement(f"TXT {key!r}: expected printable text")
    return text


def _number(props: Mapping[bytes, bytes | None], key: str, upper: int) -> int:
    text = _text(props, key)
    if not text.isdigit() or int(text) > upper:
        raise BadAnnouncement(f"TXT {key!r}: expected an integer 0..{upper}, got {text!r}")
    return int(text)


def from_txt(props: Mapping[bytes, bytes | None], address: str, port: int) -> IsuRecord:
    """Decode the TXT of a resolved service at `address`:`port`; raises BadAnnouncement."""
    uuid = _text(props, "uuid")
    try:
        uuid = str(uuidlib.UUID(uuid))
    except ValueError:
        raise BadAnnouncement(f"TXT 'uuid': expected a UUID, got {uuid!r}") from None
    role = _text(props, "role")
    if role not in ROLES:
        raise BadAnnouncement(f"TXT 'role': expected one of {ROLES}, got {role!r}")
    hb = _number(props, "hb", 65535)
    if hb == 0:
        raise BadAnnouncement("TXT 'hb': expected a heartbeat port, got 0")
    return IsuRecord(uuid=uuid, address=address, port=port, hb_port=hb,
                     state=_text(props, "state"), disks=_number(props, "disks", 10**6),
                     capacity=_number(props, "capacity", 2**64), version=_text(props, "version"),
                     config_gen=_number(props, "gen", 2**63), cluster=_text(props, "cluster"),
                     role=role, name=_text(props, "name"))


def classify(record: IsuRecord, cluster_id: str) -> IsuClass:
    """How the head of `cluster_id` sees an announced ISU."""
    if not record.cluster:
        return IsuClass.NEW
    if record.cluster != cluster_id:
        return IsuClass.FOREIGN
    if record.role == "member":
        return IsuClass.MEMBER
    if record.role == "spare":
        return IsuClass.SPARE
    return IsuClass.NEW
