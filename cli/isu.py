"""`opie isu ...`: run and inspect ISU agents."""
from __future__ import annotations

import argparse
import logging

from cli.errors import OpieError, UsageError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("isu", help="ISU (storage node) commands",
                       description="Commands that run on or talk to an ISU, a storage node that "
                                   "serves its disks over NBD.")
    isu_sub = p.add_subparsers(dest="isu_command", metavar="SUBCOMMAND", required=True)
    s = isu_sub.add_parser(
        "serve", help="serve this node's disks over NBD",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Serve each --disk as an NBD export named after the file's stem\n"
            "(disk0.img -> export 'disk0'). A missing file is created sparse at SIZE;\n"
            "an existing file or block device is served as it is and never resized.\n\n"
            "With --tls-dir (a certificate directory made by 'opie ca'), clients must use\n"
            "TLS and present a certificate signed by the cluster CA; without it plain NBD\n"
            "is served (tests and benchmarks only).\n\n"
            "When ready, prints one JSON line {\"event\": \"ready\", \"uuid\", \"listen\", \"exports\", ...}.\n"
            "SIGTERM or Ctrl-C stops it cleanly (disks synced)."),
        epilog="example: opie isu serve --disk /srv/isu0/disk0.img:2G --listen 127.0.0.1:10809 --tls-dir /etc/opie/tls")
    s.add_argument("--disk", action="append", required=True, metavar="PATH[:SIZE]",
                   help="a disk to serve; SIZE like 512M, 2G (repeatable)")
    s.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve on (port 0 picks a free port)")
    s.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the ISU keeps its identity (default /var/lib/opie/isu)")
    s.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="certificate directory (ca-cert.pem, server-cert.pem, server-key.pem)")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="serve connections on N threads (default: one per CPU, at least 2; 0 = on the main loop)")
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from isu.agent import DEFAULT_STATE_DIR, serve
    from isu.disks import DiskError
    from isu.identity import IdentityError

    try:
        return serve(args.state_dir or DEFAULT_STATE_DIR, args.disk, args.listen, args.tls_dir, args.workers)
    except (DiskError, IdentityError) as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise OpieError(f"cannot serve: {exc}") from None
