"""Names and places of volume snapshots as Samba's shadow_copy2 expects them.

A snapshot taken at UTC time T of a volume mounted at M is mounted
read-only at `M/<snapdir>/@GMT-YYYY.MM.DD-HH.MM.SS`, holding the whole
volume as it was; a share at `M/docs` then offers `M/<snapdir>/@GMT-.../docs`
as its previous version. Times are UTC (`shadow:localtime = no`).
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

log = logging.getLogger(__name__)

GMT_FORMAT = "@GMT-%Y.%m.%d-%H.%M.%S"


def gmt_name(taken_at: dt.datetime) -> str:
    """'@GMT-2026.11.21-10.00.00' for an aware or UTC-naive datetime."""
    if taken_at.tzinfo is not None:
        taken_at = taken_at.astimezone(dt.timezone.utc)
    return taken_at.strftime(GMT_FORMAT)


def parse_gmt_name(name: str) -> dt.datetime:
    """The UTC time of a '@GMT-...' name; ValueError if it is not one."""
    return dt.datetime.strptime(name, GMT_FORMAT).replace(tzinfo=dt.timezone.utc)


def snapshot_dir(volume_mountpoint: str | Path, taken_at: dt.datetime,
                 snapdir: str = ".snapshots") -> Path:
    """Where the snapshot of the volume taken at `taken_at` must be mounted."""
    return Path(volume_mountpoint, snapdir, gmt_name(taken_at))
