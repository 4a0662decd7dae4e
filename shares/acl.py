"""Per-share permissions as POSIX ACLs on the share directory.

Each allowed user and group of an SMB share gets an access entry and a
default entry (inherited by new files and directories) on the share's root
directory: rwx, or r-x for a read-only share. When a share loses an account
(or goes away) those entries are removed, then every current share's
entries are set again, so two shares on one directory do not undo each
other. Existing files below the root are not rewritten (a volume can hold
millions); they keep the entries they inherited.
"""
from __future__ import annotations

import logging
from pathlib import Path

from opie.shares.model import Share, ShareTable
from opie.shares.process import run

log = logging.getLogger(__name__)


def entries(share: Share) -> list[str]:
    """The setfacl -m entries granting `share`'s users and groups access."""
    perms = "r-x" if share.read_only else "rwx"
    out = []
    for kind, names in (("u", share.users), ("g", share.groups)):
        for name in names:
            out += [f"{kind}:{name}:{perms}", f"d:{kind}:{name}:{perms}"]
    return out


def _accounts(share: Share | None) -> set[tuple[str, str]]:
    if share is None or not share.smb:
        return set()
    return {("u", n) for n in share.users} | {("g", n) for n in share.groups}


def revocations(old: ShareTable, new: ShareTable) -> dict[Path, set[tuple[str, str]]]:
    """Per directory, the (kind, name) entries `old` granted that `new` no longer grants there."""
    out: dict[Path, set[tuple[str, str]]] = {}
    for share in old.shares:
        directory = old.directory(share)
        now = new.get(share.name)
        keep = _accounts(now) if now is not None and new.directory(now) == directory else set()
        gone = _accounts(share) - keep
        if gone:
            out.setdefault(directory, set()).update(gone)
    return out


def apply_acls(old: ShareTable, new: ShareTable) -> None:
    """Move the share directories' ACLs from what `old` granted to what `new` grants."""
    for directory, gone in revocations(old, new).items():
        if not directory.is_dir():
            continue
        spec = ",".join(f"{k}:{n},d:{k}:{n}" for k, n in sorted(gone))
        run(["setfacl", "-x", spec, str(directory)], f"setfacl -x on {directory}")
        log.info("ACL on %s: revoked %s", directory, ", ".join(n for _, n in sorted(gone)))
    for share in new.shares:
        grants = entries(share) if share.smb else []
        if grants:
            run(["setfacl", "-m", ",".join(grants), str(new.directory(share))],
                f"{share.name}: setfacl -m")


def read_acl(directory: Path) -> str:
    """getfacl's text for `directory` (for checks and the admin)."""
    return run(["getfacl", "--omit-header", "--absolute-names", str(directory)],
               f"getfacl {directory}")
