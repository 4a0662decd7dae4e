"""`opie share add|del|list`: shares on the head, or in a shares file.

Without `--config` the command goes to the running head's API, which
validates the whole change, applies it to smbd and ganesha live and records
it. With `--config FILE` it edits that file offline instead (for preparing a
head's shares before it runs). Bad input is reported as one line and changes
nothing, in either mode.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from opie.cli.errors import OpieError, UsageError
from opie.shares.errors import CallError, ValidationErrors
from opie.shares.model import Protocol, Share
from opie.shares.store import DEFAULT_STATE_DIR, load_table, save_table


def default_config() -> Path:
    state = Path(os.environ.get("OPIE_SHARES_STATE", DEFAULT_STATE_DIR))
    return state / "shares.json"


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    from opie.cli.headapi import add_head_options
    parser.add_argument("--config", type=Path, default=None,
                        help="edit this shares file (.json or .yaml) offline instead of the running head")
    add_head_options(parser)


def config_path(args: argparse.Namespace) -> Path:
    return args.config or default_config()


def _load(path: Path):
    try:
        return load_table(path)
    except ValidationErrors as exc:
        raise UsageError(str(exc)) from exc


def _api_fields(args: argparse.Namespace) -> dict:
    return {"name": args.name, "volume": args.volume, "path": args.path, "protocol": args.protocol,
            "read_only": args.read_only, "users": args.user, "groups": args.group, "guest_ok": args.guest,
            "networks": args.network, "root_squash": not args.no_root_squash,
            "previous_versions": args.previous_versions, "comment": args.comment}


def cmd_add(args: argparse.Namespace) -> int:
    if args.config is None:
        from opie.cli.headapi import call
        if args.mountpoint:
            raise UsageError("mountpoint: the head knows where its volumes are mounted; "
                             "--mountpoint goes with --config only")
        call(args, "POST", "/v1/shares", _api_fields(args))
        print(f"share {args.name} added and applied")
        return 0
    path = config_path(args)
    table = _load(path)
    if table.get(args.name) is not None:
        raise UsageError(f"name: share {args.name!r} already exists")
    volumes = dict(table.volumes)
    if args.mountpoint:
        known = volumes.get(args.volume)
        if known is not None and known != args.mountpoint:
            raise UsageError(f"mountpoint: volume {args.volume!r} is mounted at {known}, "
                             f"not {args.mountpoint}")
        volumes[args.volume] = args.mountpoint
    share = Share(name=args.name, volume=args.volume, path=args.path,
                  protocol=Protocol(args.protocol), read_only=args.read_only,
                  users=tuple(args.user), groups=tuple(args.group), guest_ok=args.guest,
                  networks=tuple(args.network), root_squash=not args.no_root_squash,
                  previous_versions=args.previous_versions, comment=args.comment)
    new = type(table)(volumes, table.shares).with_share(share)
    try:
        new.validate()
        save_table(path, new)
    except ValidationErrors as exc:
        raise UsageError(str(exc)) from exc
    except CallError as exc:
        raise OpieError(str(exc)) from exc
    print(f"share {args.name} added to {path}")
    return 0


def cmd_del(args: argparse.Namespace) -> int:
    if args.config is None:
        from opie.cli.headapi import call
        call(args, "DELETE", f"/v1/shares/{args.name}")
        print(f"share {args.name} removed")
        return 0
    path = config_path(args)
    table = _load(path)
    try:
        save_table(path, table.without_share(args.name))
    except ValidationErrors as exc:
        raise UsageError(str(exc)) from exc
    except CallError as exc:
        raise OpieError(str(exc)) from exc
    print(f"share {args.name} removed from {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.config is None:
        from opie.cli.headapi import call
        from opie.shares.model import ShareTable
        table = ShareTable.from_dict({"volumes": {}, "shares": call(args, "GET", "/v1/shares")})
    else:
        table = _load(config_path(args))
    if args.json:
        print(json.dumps(table.to_dict(), indent=2))
        return 0
    rows = [("NAME", "PROTOCOL", "DIRECTORY", "ACCESS", "ALLOWED")]
    for share in sorted(table.shares, key=lambda s: s.name.lower()):
        directory = str(table.directory(share)) if share.volume in table.volumes else \
            f"{share.volume}:/{share.path}"
        allowed = list(share.users) + [f"@{g}" for g in share.groups] + list(share.networks)
        rows.append((share.name, share.protocol.value, directory,
                     "ro" if share.read_only else "rw", ",".join(allowed) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("share", help="SMB and NFS shares",
                                   description="Add, remove and list SMB/NFS shares.")
    sub = parser.add_subparsers(dest="share_command", metavar="ACTION", required=True)

    add = sub.add_parser("add", help="add a share")
    add.add_argument("name", help="share name (SMB share, NFS path /NAME)")
    add.add_argument("--volume", required=True, help="volume the share lives on")
    add.add_argument("--mountpoint", help="where the volume is mounted (recorded once)")
    add.add_argument("--path", default="", help="directory inside the volume (default: its root)")
    add.add_argument("--protocol", choices=[p.value for p in Protocol], default="smb")
    add.add_argument("--read-only", action="store_true")
    add.add_argument("--user", action="append", default=[], help="SMB user allowed (repeat)")
    add.add_argument("--group", action="append", default=[], help="SMB group allowed (repeat)")
    add.add_argument("--guest", action="store_true", help="allow SMB guests (off by default)")
    add.add_argument("--network", action="append", default=[],
                     help="NFS client network allowed, e.g. 192.168.1.0/24 (repeat)")
    add.add_argument("--no-root-squash", action="store_true", help="NFS: trust client root")
    add.add_argument("--previous-versions", action="store_true",
                     help="SMB: offer snapshots as Previous Versions")
    add.add_argument("--comment", default="")
    add_config_arg(add)
    add.set_defaults(func=cmd_add)

    delete = sub.add_parser("del", help="remove a share")
    delete.add_argument("name")
    add_config_arg(delete)
    delete.set_defaults(func=cmd_del)

    lst = sub.add_parser("list", help="list shares")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    add_config_arg(lst)
    lst.set_defaults(func=cmd_list)
