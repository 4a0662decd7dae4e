"""Entry point of the `opie` console script.

Command families register themselves from the modules listed in FAMILIES; a
family whose module is missing is simply absent, and one that fails to import
is reported and skipped so the other commands keep working. Families import
their heavy dependencies inside their handlers, keeping `opie --help` fast. Errors meant for the admin
are raised as `cli.errors.UsageError` / `OpieError` and printed as one line
(`opie: ...`) with a non-zero exit, never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from opie.cli.errors import OpieError

FAMILIES = ["ca", "isu", "head", "ha", "array", "snapshot", "lab", "status", "backup", "share", "user"]

log = logging.getLogger("opie")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opie",
        description=(
            "Opie, a scale-out NAS head. ISUs serve their disks over NBD; heads run "
            "RAID5 across them, add copy-on-write snapshots and serve SMB/NFS shares."
        ),
        epilog="Run 'opie COMMAND --help' for the options of each command.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in FAMILIES:
        try:
            module = importlib.import_module(f"opie.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"opie.cli.{name}":
                continue
            log.warning("'opie %s' is unavailable: %s", name, exc)
            continue
        except ImportError as exc:  # one broken family must not take the others down
            log.warning("'opie %s' is unavailable: %s", name, exc)
            continue
        module.register(sub)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        rc = args.func(args)
    except OpieError as exc:
        print(f"opie: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `opie status | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
