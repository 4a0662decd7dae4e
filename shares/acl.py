"""Per-share permissions as POSIX ACLs on the share directory.

Each allowed user and group of an SMB share gets an access entry and a
default entry (inherited by new files and directories) on the share's root
directory: rwx, or r-x for a read-only share. Entries of accounts no longer
allowed are removed. Existing files below the root are not rewritten (a
volume can hold millions); they keep the entries they inherited.
"""
from __future__ import annotations

import logging
from pathlib import Path

from shares.model import Share
from shares.process import run

log = logging.getLogger(__name__)


def entries(share: Share) -> list[str]:
    """The setfacl -m entries granting `share`'s users and groups access."""
    perms = "r-x" if share.read_only else "rwx"
    out = []
    for kind, names in (("u", share.users), ("g", share.groups)):
        for name in names:
            out += [f"{kind}:{name}:{perms}", f"d:{kind}:{name}:{perms}"]
    return out


def apply_share_acl(directory: Path, share: Share, previous: Share | None = None) -> None:
    """Grant `share`'s accounts access to `directory`, revoking those only `previous` had."""
    removed = []
    if previous is not None:
        for kind, old, new in (("u", previous.users, share.users),
                               ("g", previous.groups, share.groups)):
            removed += [f"{kind}:{n},d:{kind}:{n}" for n in old if n not in new]
    if removed:
        run(["setfacl", "-x", ",".join(removed), str(directory)], f"{share.name}: setfacl -x")
    grants = entries(share)
    if grants:
        run(["setfacl", "-m", ",".join(grants), str(directory)], f"{share.name}: setfacl -m")
    if grants or removed:
        log.info("%s: ACL on %s now grants %s", share.name, directory,
                 ", ".join(g for g in grants if not g.startswith("d:")) or "nobody extra")


def read_acl(directory: Path) -> str:
    """getfacl's text for `directory` (for checks and the admin)."""
    return run(["getfacl", "--omit-header", "--absolute-names", str(directory)],
               f"getfacl {directory}")
