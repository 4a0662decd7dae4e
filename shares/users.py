"""Share users: Unix accounts and Samba's passdb kept in step.

An Opie user is a Unix account (created with `useradd`, no home, no login
shell, unless a regular account of that name already exists) plus an entry
in the passdb of one smb.conf. The store (a JSON file under a state dir)
records which users Opie manages and whether it created the Unix account,
so `delete` removes only accounts Opie made. Every method validates first
and raises `ValidationErrors` with nothing changed; a failing step after
that is rolled back where possible and raised as `CallError`.
"""
from __future__ import annotations

import fcntl
import json
import errno
import logging
import pwd
import grp
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from opie.shares.errors import CallError, ValidationErrors
from opie.fileio import atomic_write
from opie.shares.model import ACCOUNT_NAME_RE
from opie.shares.process import run

log = logging.getLogger(__name__)

FIRST_REGULAR_UID = 1000
RESERVED_NAMES = frozenset({"root", "nobody", "nogroup", "daemon", "bin", "sys", "adm",
                            "admin", "administrator", "guest", "opie", "sudo", "wheel"})
MAX_PASSWORD = 127


@dataclass(frozen=True)
class UserInfo:
    """One managed user as `list` reports it."""

    name: str
    uid: int | None
    unix_created: bool
    in_passdb: bool

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "uid": self.uid, "unix_created": self.unix_created,
                "in_passdb": self.in_passdb}


def check_password(errors: ValidationErrors, password: str) -> None:
    if not password:
        errors.add("password", "must not be empty")
    elif len(password) > MAX_PASSWORD or any(c in password for c in "\r\n\0"):
        errors.add("password", f"at most {MAX_PASSWORD} characters, no line breaks")


class UserManager:
    """Users of the smbd configured by `smb_conf`, recorded in `store_path`."""

    def __init__(self, smb_conf: Path, store_path: Path) -> None:
        self.smb_conf = Path(smb_conf)
        self.store_path = Path(store_path)

    # -- store -------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, object]]]:
        self.store_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.store_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                users = json.loads(self.store_path.read_text())["users"]
            except FileNotFoundError:
                users = {}
            except (ValueError, KeyError, TypeError) as exc:
                raise CallError(f"users store {self.store_path} is corrupt: {exc}",
                                errno.EBADMSG) from exc
            before = json.dumps(users, sort_keys=True)
            yield users
            if json.dumps(users, sort_keys=True) != before:
                atomic_write(self.store_path,
                             json.dumps({"version": 1, "users": users}, indent=2, sort_keys=True),
                             mode=0o600)

    def _need_conf(self) -> None:
        if not self.smb_conf.is_file():
            raise CallError(f"no smb.conf at {self.smb_conf}", errno.ENOENT)

    def _smbpasswd(self, args: list[str], name: str, password: str | None, what: str) -> None:
        stdin = f"{password}\n{password}\n".encode() if password is not None else None
        run(["smbpasswd", "-c", str(self.smb_conf), *args, name], what, stdin=stdin)

    # -- operations --------------------------------------------------------

    def add(self, name: str, password: str, groups: tuple[str, ...] = ()) -> None:
        """Create the Unix account (unless a regular one exists) and the passdb entry."""
        errors = ValidationErrors()
        if not ACCOUNT_NAME_RE.fullmatch(name):
            errors.add("user", f"{name!r} is not a valid user name (lower-case letters, digits, "
                       "'_' and '-', starting with a letter or '_', at most 32)")
        elif name in RESERVED_NAMES:
            errors.add("user", f"{name!r} is reserved")
        check_password(errors, password)
        for group in groups:
            try:
                grp.getgrnam(group)
            except KeyError:
                errors.add("groups", f"no such group {group!r}")
        existing = None
        if not errors.errors:
            try:
                existing = pwd.getpwnam(name)
            except KeyError:
                pass
            if existing is not None and existing.pw_uid < FIRST_REGULAR_UID:
                errors.add("user", f"{name!r} is a system account (uid {existing.pw_uid})")
        errors.check()
        self._need_conf()
        with self._locked() as users:
            if name in users:
                raise ValidationErrors([("user", f"{name!r} already exists")])
            created = existing is None
            if created:
                argv = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "--user-group"]
                if groups:
                    argv += ["--groups", ",".join(groups)]
                run(argv + [name], f"useradd {name}")
            try:
                self._smbpasswd(["-a", "-s"], name, password, f"smbpasswd -a {name}")
            except CallError:
                if created:
                    run(["userdel", name], f"userdel {name} (rollback)")
                raise
            users[name] = {"unix_created": created}
        log.info("user %s: added (unix account %s)", name, "created" if created else "adopted")

    def passwd(self, name: str, password: str) -> None:
        """Change the Samba password of a managed user."""
        errors = ValidationErrors()
        check_password(errors, password)
        errors.check()
        self._need_conf()
        with self._locked() as users:
            if name not in users:
                raise ValidationErrors([("user", f"no such user {name!r}")])
            self._smbpasswd(["-s"], name, password, f"smbpasswd {name}")
        log.info("user %s: password changed", name)

    def delete(self, name: str) -> None:
        """Remove the passdb entry, then the Unix account if Opie created it."""
        self._need_conf()
        with self._locked() as users:
            if name not in users:
                raise ValidationErrors([("user", f"no such user {name!r}")])
            if name in self._passdb_names():
                self._smbpasswd(["-x"], name, None, f"smbpasswd -x {name}")
            if users[name].get("unix_created"):
                try:
                    pwd.getpwnam(name)
                    run(["userdel", name], f"userdel {name}")
                except KeyError:
                    pass
            del users[name]
        log.info("user %s: deleted", name)

    def _passdb_names(self) -> set[str]:
        out = run(["pdbedit", "-s", str(self.smb_conf), "-L"], "pdbedit -L")
        return {line.split(":", 1)[0] for line in out.splitlines() if ":" in line}

    def list(self) -> list[UserInfo]:
        """Managed users, sorted by name, with their uid and passdb state."""
        self._need_conf()
        with self._locked() as users:
            known = dict(users)
        passdb = self._passdb_names()
        out = []
        for name in sorted(known):
            try:
                uid: int | None = pwd.getpwnam(name).pw_uid
            except KeyError:
                uid = None
            out.append(UserInfo(name, uid, bool(known[name].get("unix_created")),
                                name in passdb))
        return out
