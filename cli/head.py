"""`opie head run`: the head daemon."""
from __future__ import annotations

import argparse

from opie.cli.errors import OpieError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("head", help="run the head daemon",
                       description="The head runs RAID5 across the ISUs' exports, the volumes and "
                                   "snapshots on it, their NBD exports and mounted filesystems, and the API.")
    hs = p.add_subparsers(dest="head_command", metavar="SUBCOMMAND", required=True)
    r = hs.add_parser(
        "run", help="run the head in the foreground",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Run the head configured by STATE_DIR/head.json (see head/config.py for its\n"
                     "fields). Assembles the array from its members (any order; degraded with one\n"
                     "missing), or creates it when create_array is set and every member is blank;\n"
                     "never formats a member that holds something else. Prints one JSON ready line\n"
                     "with the API address and token file. SIGTERM or Ctrl-C stops it cleanly."))
    r.add_argument("--state-dir", required=True, metavar="DIR")
    r.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from opie.head.config import ConfigError
    from opie.head.daemon import run
    from opie.head.errors import HeadError
    try:
        return asyncio.run(run(args.state_dir))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except HeadError as exc:
        raise OpieError(str(exc)) from None
