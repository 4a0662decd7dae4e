"""`opie snapshot create|delete|list|mount`."""
from __future__ import annotations

import argparse
import json

from opie.cli.headapi import add_head_options, call


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshot", help="copy-on-write snapshots of volumes",
                       description="Snapshots are read-only, taken with the filesystem frozen so they are "
                                   "consistent, exported over NBD as VOLUME@NAME, and cost no extra write "
                                   "work however many are held. Deleting one gives its space back.")
    s = p.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND", required=True)
    c = s.add_parser("create", help="take a snapshot")
    c.add_argument("volume")
    c.add_argument("name")
    d = s.add_parser("delete", help="delete a snapshot")
    d.add_argument("volume")
    d.add_argument("name")
    ls = s.add_parser("list", help="list snapshots")
    ls.add_argument("volume", nargs="?")
    ls.add_argument("--json", action="store_true")
    m = s.add_parser("mount", help="mount a snapshot read-only")
    m.add_argument("volume")
    m.add_argument("name")
    m.add_argument("--mountpoint", help="where (default: under the head's mount root)")
    for x, fn in ((c, _create), (d, _delete), (ls, _list), (m, _mount)):
        add_head_options(x)
        x.set_defaults(func=fn)


def _create(args):
    snap = call(args, "POST", "/v1/snapshots", {"volume": args.volume, "name": args.name})
    print(f"snapshot {args.volume}@{args.name} taken; export {snap['export']}")
    return 0


def _delete(args):
    call(args, "DELETE", f"/v1/snapshots/{args.volume}/{args.name}")
    print(f"snapshot {args.volume}@{args.name} deleted")
    return 0


def _list(args):
    st = call(args, "GET", "/v1/status")
    snaps = [dict(s, volume=v["name"]) for v in st["volumes"] for s in v["snapshots"]
             if args.volume in (None, v["name"])]
    if args.json:
        print(json.dumps(snaps, indent=2))
    else:
        for s in snaps:
            print(f"{s['volume']}@{s['name']}")
    return 0


def _mount(args):
    body = {"mountpoint": args.mountpoint} if args.mountpoint else {}
    m = call(args, "POST", f"/v1/snapshots/{args.volume}/{args.name}/mount", body)
    print(f"{args.volume}@{args.name} mounted read-only at {m['mountpoint']}")
    return 0
