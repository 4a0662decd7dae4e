"""`opie backup run|restore`."""
from __future__ import annotations

import argparse
import json

from opie.cli.headapi import add_head_options, call, follow


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup", help="back up and restore volumes",
                       description="Backups take a consistent snapshot, copy it to a target (a directory "
                                   "holding VOLUME.img and its manifest, or an nbd:// / nbds:// export), "
                                   "verify the copy, and delete older backup snapshots. Later runs to the "
                                   "same target copy only the segments changed since the previous run.")
    s = p.add_subparsers(dest="backup_command", metavar="SUBCOMMAND", required=True)
    r = s.add_parser("run", help="back up VOLUME to TARGET, showing progress")
    r.add_argument("volume")
    r.add_argument("--to", required=True, metavar="TARGET", help="directory or NBD URI")
    r.add_argument("--keep-snapshot", action="store_true",
                   help="keep this backup's snapshot (normally only the newest one is kept, as the "
                        "base of the next incremental run)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    rs = s.add_parser("restore", help="restore VOLUME from the backup in SOURCE",
                      description="Copy the backup image back into VOLUME (unmounted meanwhile) and "
                                  "verify every segment against the backup's manifest.")
    rs.add_argument("volume")
    rs.add_argument("--from", dest="source", required=True, metavar="SOURCE")
    rs.add_argument("--json", action="store_true")
    for x, fn in ((r, _run), (rs, _restore)):
        add_head_options(x)
        x.set_defaults(func=fn)


def _run(args) -> int:
    job = call(args, "POST", "/v1/backups", {"volume": args.volume, "to": args.to,
                                             "keep_snapshot": args.keep_snapshot})
    r = follow(args, job, quiet=args.json)["result"]
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['kind']} backup of {r['volume']} to {r['target']}: {r['segments_copied']} segments "
              f"({r['bytes_copied']} bytes) copied and verified; snapshot {r['snapshot']}")
    return 0


def _restore(args) -> int:
    job = call(args, "POST", "/v1/restores", {"volume": args.volume, "from": args.source})
    r = follow(args, job, quiet=args.json)["result"]
    print(json.dumps(r, indent=2) if args.json else
          f"restored {r['volume']} from {r['source']} (backup snapshot {r['snapshot']}), verified")
    return 0
