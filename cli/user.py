"""`opie user add|passwd|del|list`: share users (Unix account + Samba passdb).

Passwords are read from stdin (`--password-stdin`, one line) or prompted
for on a terminal, never taken from the command line.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from opie.cli.errors import OpieError, UsageError
from opie.cli.share import add_config_arg, config_path
from opie.shares.errors import CallError, ValidationErrors
from opie.shares.smb import SmbSettings
from opie.shares.smbd import write_config
from opie.shares.store import DEFAULT_STATE_DIR, load_table
from opie.shares.users import UserManager


def manager(args: argparse.Namespace) -> UserManager:
    """The user manager of the state dir; writes smb.conf first if there is none."""
    state = Path(args.state_dir or os.environ.get("OPIE_SHARES_STATE", DEFAULT_STATE_DIR))
    settings = SmbSettings(state_dir=str(state / "smb"))
    if not settings.conf_path.is_file():
        try:
            write_config(settings.validate(), load_table(config_path(args)).validate())
        except ValidationErrors as exc:
            raise UsageError(str(exc)) from exc
    return UserManager(settings.conf_path, state / "users.json")


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if not sys.stdin.isatty():
        raise UsageError("password: use --password-stdin when stdin is not a terminal")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Retype new password: ") != first:
        raise UsageError("password: the two passwords differ")
    return first


def _run(action) -> int:
    try:
        action()
    except ValidationErrors as exc:
        raise UsageError(str(exc)) from exc
    except CallError as exc:
        raise OpieError(str(exc)) from exc
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    users = manager(args)
    password = read_password(args)
    _run(lambda: users.add(args.name, password, tuple(args.group)))
    print(f"user {args.name} added")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    users = manager(args)
    password = read_password(args)
    _run(lambda: users.passwd(args.name, password))
    print(f"password of {args.name} changed")
    return 0


def cmd_del(args: argparse.Namespace) -> int:
    _run(lambda: manager(args).delete(args.name))
    print(f"user {args.name} deleted")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    found = []
    _run(lambda: found.extend(manager(args).list()))
    if args.json:
        print(json.dumps([u.to_dict() for u in found], indent=2))
        return 0
    print(f"{'NAME':<32} {'UID':>6}  SAMBA  UNIX ACCOUNT")
    for user in found:
        print(f"{user.name:<32} {user.uid if user.uid is not None else '-':>6}  "
              f"{'yes' if user.in_passdb else 'NO':<5}  "
              f"{'created by opie' if user.unix_created else 'pre-existing'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("user", help="share users",
                                   description="Unix accounts and Samba passwords, in step.")
    sub = parser.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", type=Path, default=None,
                       help="shares state dir (default: $OPIE_SHARES_STATE, /var/lib/opie/shares)")
        add_config_arg(p)

    for name, func, text in (("add", cmd_add, "add a user"),
                             ("passwd", cmd_passwd, "change a user's password")):
        p = sub.add_parser(name, help=text)
        p.add_argument("name")
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password as one line from stdin")
        if name == "add":
            p.add_argument("--group", action="append", default=[],
                           help="supplementary Unix group (repeat)")
        common(p)
        p.set_defaults(func=func)
    p = sub.add_parser("del", help="delete a user")
    p.add_argument("name")
    common(p)
    p.set_defaults(func=cmd_del)
    p = sub.add_parser("list", help="list users")
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=cmd_list)
