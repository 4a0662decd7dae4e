"""`opie isu ...`: run and inspect ISU agents."""
from __future__ import annotations

import argparse
import logging

from opie.cli.errors import OpieError, UsageError
from opie.isu.control import CONTROL_PORT

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
            "With --tls-dir (a certificate directory made by 'opie ca', role isu), clients\n"
            "must use TLS and present a certificate signed by the cluster CA, and only a\n"
            "head's certificate may adopt the ISU. Without it plain NBD is served, on a\n"
            "loopback address only (tests and benchmarks) unless --insecure is given.\n\n"
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
    s.add_argument("--insecure", action="store_true",
                   help="INSECURE: allow serving without --tls-dir on a network address (0.0.0.0 or a "
                        "non-loopback address): anyone who reaches it can read and write the disks. "
                        "Logged at WARNING. Loopback needs no flag")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="serve connections on N threads (default: one per CPU, at least 2; 0 = on the main loop)")
    g = s.add_argument_group("cluster services (see isu/services.py)")
    g.add_argument("--announce", metavar="IFADDR",
                   help="announce _opie-isu._tcp on this IPv4 address and answer heads' heartbeats "
                        "(implied, on the leased address, by --lease)")
    g.add_argument("--lease", metavar="IFNAME",
                   help="take an address for IFNAME from the head's lease server before serving, "
                        "then keep renewing it")
    g.add_argument("--cluster-token-file", metavar="FILE",
                   help="the cluster token (hex) that signs lease messages; needed by --lease")
    g.add_argument("--control-port", type=int, default=CONTROL_PORT, metavar="PORT",
                   help=f"port of the control channel heads adopt this ISU through, on the announced "
                        f"address (default {CONTROL_PORT}; 0 picks a free port)")
    g.add_argument("--console", metavar="DEVICE", help="serve the admin console on this serial device")
    g.add_argument("--interface", metavar="IFNAME",
                   help="where a console-set address goes (default: the --lease interface, else eth0)")
    g.add_argument("--watch-disks", nargs="?", const="", default=None, metavar="PATTERN",
                   help="follow disks coming and going (kernel uevents): a new disk is listed as "
                        "unassigned, a served disk that disappears fails at once; PATTERN "
                        "(fnmatch on kernel names, e.g. 'sd*') picks the disks to follow")
    s.set_defaults(func=_serve)

    c = isu_sub.add_parser(
        "console", help="talk to an ISU's serial console",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Send each COMMAND (one argument each, e.g. 'status' 'set name isu3') to the\n"
                     "ISU console on DEVICE and print the answers. Without COMMAND: 'status'.\n"
                     "Exits 1 if the ISU answered any command with an error (it changed nothing)."),
        epilog="example: opie isu console /dev/ttyUSB0 'set address 10.0.0.5/24' status")
    c.add_argument("device", metavar="DEVICE")
    c.add_argument("commands", nargs="*", metavar="COMMAND")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer")
    c.set_defaults(func=_console)

    from opie.cli.headapi import add_head_options
    ls = isu_sub.add_parser("list", help="ISUs the head has discovered",
                            description="Every ISU the head sees on the network: its class (new, "
                                        "member, spare, foreign), liveness, address and TXT.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    add_head_options(ls)
    ls.set_defaults(func=_list)
    ad = isu_sub.add_parser("adopt", help="bring a new ISU into the cluster",
                            description="Adopt the ISU UUID as an array member or a spare: the head "
                                        "records it in its config and tells the ISU its cluster.")
    ad.add_argument("uuid", metavar="UUID")
    ad.add_argument("--as", dest="role", required=True, choices=("member", "spare"))
    ad.add_argument("--json", action="store_true", help="machine-readable output")
    add_head_options(ad)
    ad.set_defaults(func=_adopt)


def _serve(args: argparse.Namespace) -> int:
    from opie.isu.agent import DEFAULT_STATE_DIR
    from opie.isu.node import serve
    from opie.isu.disks import DiskError
    from opie.isu.errors import FencingError
    from opie.isu.identity import IdentityError
    from opie.isu.services import ServiceOptions

    try:
        options = ServiceOptions(announce=args.announce, lease=args.lease,
                                 token_file=args.cluster_token_file, console=args.console,
                                 interface=args.interface, watch_disks=args.watch_disks,
                                 control_port=args.control_port)
        return serve(args.state_dir or DEFAULT_STATE_DIR, args.disk, args.listen, args.tls_dir, args.workers,
                     options, insecure=args.insecure)
    except (DiskError, IdentityError) as exc:
        raise UsageError(str(exc)) from None
    except FencingError as exc:   # a torn epoch record: never served as epoch 0
        raise OpieError(f"cannot serve: {exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise OpieError(f"cannot serve: {exc}") from None


def _console(args: argparse.Namespace) -> int:
    from opie.isu.console import ConsoleError, run_admin_console

    try:
        replies = run_admin_console(args.device, args.commands or ["status"], timeout=args.timeout)
    except ConsoleError as exc:
        raise OpieError(str(exc)) from None
    except OSError as exc:
        raise OpieError(f"cannot open {args.device}: {exc.strerror or exc}") from None
    for reply in replies:
        for line in reply.lines:
            print(line)
        print(reply.final)
    return 0 if all(r.ok for r in replies) else 1


def _list(args: argparse.Namespace) -> int:
    import json

    from opie.cli.headapi import call
    isus = call(args, "GET", "/v1/isus")["isus"]
    if args.json:
        print(json.dumps(isus, indent=2))
        return 0
    if not isus:
        print("no ISU discovered")
    for i in isus:
        print(f"{i['uuid']}  {i['class']:<7} {'alive' if i['alive'] else 'DEAD':<5} {i['address']}:{i['port']:<5}  "
              f"{i['state']:<12} disks {i['disks']}  gen {i['config_gen']}  {i['name'] or ''}")
    return 0


def _adopt(args: argparse.Namespace) -> int:
    import json
    import urllib.parse

    from opie.cli.headapi import call
    isu = call(args, "POST", f"/v1/isus/{urllib.parse.quote(args.uuid, safe='')}/adopt", {"role": args.role})
    if args.json:
        print(json.dumps(isu, indent=2))
    else:
        print(f"adopted {isu['uuid']} as {isu['role']} (exports {', '.join(isu['exports'])}; "
              f"ISU config generation {isu['config_gen']})")
    return 0
