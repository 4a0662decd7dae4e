"""The shares service: one object the head drives with start / apply / stop.

`apply(table)` first validates the whole table (syntax, paths inside their
volumes, accounts that exist) and raises `ValidationErrors` before anything
is touched; only then does it create share directories, set their ACLs and
move each running server to the new table without a restart. Servers are
found through the kind registry (`shares.base.KINDS`), one per protocol
with settings given.
"""
from __future__ import annotations

import grp
import logging
import pwd
from typing import Any, Mapping

from opie.shares.acl import apply_acls
from opie.shares.base import KINDS, ServerRunner, ShareKind
from opie.shares.errors import ValidationErrors
from opie.shares.model import Protocol, ShareTable

# Importing the server modules registers their kinds.
from opie.shares import ganesha as _ganesha, smbd as _smbd  # noqa: F401

log = logging.getLogger(__name__)


def account_errors(table: ShareTable) -> ValidationErrors:
    """Users and groups named by shares that have no Unix account."""
    errors = ValidationErrors()
    for share in table.shares:
        for user in share.users:
            try:
                pwd.getpwnam(user)
            except KeyError:
                errors.add(f"shares.{share.name}.users", f"no such user {user!r}")
        for group in share.groups:
            try:
                grp.getgrnam(group)
            except KeyError:
                errors.add(f"shares.{share.name}.groups", f"no such group {group!r}")
    return errors


class ShareService:
    """Runs one server per configured protocol over a `ShareTable`.

    `settings` maps a protocol (SMB, NFS) to its settings; `runner_options`
    passes extra keyword arguments to that kind's runner (e.g. NFS `netns`,
    `rpcbind`). Not thread-safe: one caller (the head's config task) drives it.
    """

    def __init__(self, settings: Mapping[Protocol, Any],
                 runner_options: Mapping[Protocol, Mapping[str, Any]] | None = None) -> None:
        self.kinds: list[ShareKind] = []
        self.runners: dict[Protocol, ServerRunner] = {}
        options = runner_options or {}
        for protocol, kind_cls in KINDS.items():
            if protocol in settings:
                kind = kind_cls(settings[protocol].validate())
                self.kinds.append(kind)
                self.runners[protocol] = kind.runner(**options.get(protocol, {}))
        self.table = ShareTable()

    def check(self, table: ShareTable) -> ShareTable:
        """Raise ValidationErrors for anything wrong with `table`; change nothing."""
        errors = table.errors()
        errors.extend(account_errors(table))
        errors.check()
        return table

    def _prepare(self, table: ShareTable) -> None:
        for share in table.shares:
            directory = table.directory(share)
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                log.info("%s: created %s", share.name, directory)
        apply_acls(self.table, table)

    def start(self, table: ShareTable) -> None:
        """Validate, prepare directories and start every server; on failure stop them all."""
        self.check(table)
        self._prepare(table)
        try:
            for runner in self.runners.values():
                runner.start(table)
        except Exception:
            self.stop()
            raise
        self.table = table

    def apply(self, table: ShareTable) -> None:
        """Validate `table`, then move every running server to it without a restart.

        Raises ValidationErrors with nothing changed, or CallError from a
        server (config files already rewritten; the next start uses them).
        """
        self.check(table)
        self._prepare(table)
        for runner in self.runners.values():
            runner.apply(table)
        self.table = table
        log.info("shares: applied %d shares", len(table.shares))

    def stop(self) -> None:
        """Stop every server and helper process; safe to repeat."""
        for runner in self.runners.values():
            runner.stop()
