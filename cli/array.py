"""`opie array scrub`: check every block of the array and repair what is bad."""
from __future__ import annotations

import argparse
import json

from opie.cli.headapi import add_head_options, call, follow


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("array", help="RAID5 array operations")
    a = p.add_subparsers(dest="array_command", metavar="SUBCOMMAND", required=True)
    s = a.add_parser("scrub", help="read and verify every block, repair bad ones",
                     description="Run a scrub to the end, showing progress: every block is read and "
                                 "checked against its checksum and the stripe's parity; a bad block is "
                                 "rewritten from parity. Reports checked / repaired / unrecoverable "
                                 "blocks and the members they were on. Exit 1 if any block was unrecoverable.")
    s.add_argument("--json", action="store_true", help="machine-readable report")
    add_head_options(s)
    s.set_defaults(func=_scrub)


def _scrub(args: argparse.Namespace) -> int:
    job = call(args, "POST", "/v1/array/scrub")
    job = follow(args, job, quiet=args.json)
    r = job["result"]
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(r["summary"])
        for b in r["bad"][:20]:
            print(f"  bad block on {b['member']}: stripe {b['stripe']}, block {b['block']}")
    return 1 if r["unrecoverable"] else 0
