"""Thin volumes and copy-on-write snapshots on a block device.

`Pool` is the entry point (format/open, volumes, snapshots, changed-segment
maps for backups, `check()`); volumes and snapshots open as block devices
with the same interface as the device below (`devices.BlockDevice`).
"""

from opie.head.volumes.devices import BlockDevice, CrashDevice, FileDevice, MemoryDevice
from opie.head.volumes.errors import IntegrityError, NotFoundError, UnsupportedVersion, ValidationError
from opie.head.volumes.model import CheckReport, PoolSpace, SnapshotInfo, VolumeInfo
from opie.head.volumes.pool import DEFAULT_SEGMENT, Pool
from opie.head.volumes.volume import SnapshotDevice, VolumeDevice

__all__ = ["BlockDevice", "CheckReport", "CrashDevice", "DEFAULT_SEGMENT", "FileDevice",
           "IntegrityError", "MemoryDevice", "NotFoundError", "Pool", "PoolSpace",
           "SnapshotDevice", "SnapshotInfo", "UnsupportedVersion", "ValidationError", "VolumeDevice",
           "VolumeInfo"]
