"""Shares: SMB through Samba's smbd and NFS through NFS-Ganesha.

Public API (what the head calls):

- `ShareTable`, `Share`, `Protocol` (shares.model): the share definitions;
  `ShareTable.validate()` raises `ValidationErrors` collected by field.
- `smb.render(table, SmbSettings) -> str`, `nfs.render(table, NfsSettings) -> str`:
  pure config renderers.
- `ShareService({Protocol.SMB: SmbSettings, Protocol.NFS: NfsSettings})`
  with `start(table)`, `apply(table)`, `stop()` (shares.service); servers run
  as child processes, or as systemd units with
  `runner_options={p: {"launcher": shares.systemd.systemd_launcher()}}`.
- `UserManager(smb_conf, store_path)` with `add`, `passwd`, `delete`, `list`
  (shares.users).
- `snapshot_dir(volume_mountpoint, taken_at)` (shares.snapshots): where a
  snapshot must be mounted for "Previous Versions".
"""
from opie.shares.errors import CallError, ValidationErrors
from opie.shares.model import Protocol, Share, ShareTable
from opie.shares.nfs import NfsSettings
from opie.shares.service import ShareService
from opie.shares.smb import SmbSettings
from opie.shares.snapshots import gmt_name, snapshot_dir
from opie.shares.users import UserManager

__all__ = ["CallError", "NfsSettings", "Protocol", "Share", "ShareService", "ShareTable",
           "SmbSettings", "UserManager", "ValidationErrors", "gmt_name", "snapshot_dir"]
