"""`opie lab up|down|status`: the embedded lab on one machine."""
from __future__ import annotations

import argparse
import json

from opie.cli.errors import OpieError, UsageError

DEFAULT_DIR = "/var/tmp/opie-lab"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="run a whole Opie cluster on this machine",
                       description="The embedded lab: ISUs (and, as they land, heads, volumes and "
                                   "shares) as processes on loopback, with a lab CA for TLS.")
    lab_sub = p.add_subparsers(dest="lab_command", metavar="SUBCOMMAND", required=True)
    up = lab_sub.add_parser(
        "up", help="start the lab and keep it running until Ctrl-C",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Start the lab in DIR: a cluster CA, --isus ISU agents each serving one sparse\n"
                     "disk of --disk-size over NBD with TLS. Reuses the disks and identities already\n"
                     "in DIR, so data survives a restart. Writes DIR/lab.json and prints how to\n"
                     "connect. Runs in the foreground: Ctrl-C (or 'opie lab down --dir DIR' from\n"
                     "another shell) stops every process cleanly."))
    up.add_argument("--dir", default=DEFAULT_DIR, help=f"lab directory (default {DEFAULT_DIR})")
    up.add_argument("--isus", type=int, default=5, help="number of ISUs (default 5)")
    up.add_argument("--disk-size", default="2G", help="size of each ISU's disk (default 2G)")
    up.add_argument("--no-head", action="store_true", help="start the ISUs only")
    up.add_argument("--detach", action="store_true",
                    help="start the lab, print it and return; stop it later with 'opie lab down'")
    up.add_argument("--netns", action="store_true",
                    help="run the head and the ISUs as hosts in network namespaces on one bridge: the "
                         "ISUs lease their addresses from the head and are found by discovery "
                         "(lab/netns_lab.py); runs in the foreground")
    up.add_argument("--no-adopt", action="store_true",
                    help="with --netns: leave the ISUs unadopted (adopt them with 'opie isu adopt')")
    up.set_defaults(func=_up)
    down = lab_sub.add_parser("down", help="stop the lab running in DIR",
                              description="Stop every process listed in DIR/lab.json (SIGTERM, then "
                                          "SIGKILL after 15 s). Disks stay.")
    down.add_argument("--dir", default=DEFAULT_DIR)
    down.set_defaults(func=_down)
    st = lab_sub.add_parser("status", help="show the lab in DIR",
                            description="Print DIR/lab.json with each process marked alive or dead.")
    st.add_argument("--dir", default=DEFAULT_DIR)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)


def _up(args: argparse.Namespace) -> int:
    from opie.isu.disks import DiskError, parse_size
    from opie.lab.runner import Lab, LabError, summary
    if args.netns:
        return _up_netns(args)
    try:
        parse_size(args.disk_size)
        lab = Lab(args.dir, isus=args.isus, disk_size=args.disk_size, with_head=not args.no_head)
        info = lab.up()
    except (LabError, DiskError) as exc:
        raise UsageError(str(exc)) from None
    print(summary(info), flush=True)
    if args.detach:  # children keep running in their own sessions
        return 0
    return lab.wait()


def _up_netns(args: argparse.Namespace) -> int:
    from opie.isu.disks import DiskError, parse_size
    from opie.lab.netns_lab import NetnsLab, summary
    from opie.lab.runner import LabError
    if args.detach or args.no_head:
        raise UsageError("--netns runs in the foreground with a head (no --detach, no --no-head)")
    try:
        parse_size(args.disk_size)
        lab = NetnsLab(args.dir, isus=args.isus, disk_size=args.disk_size)
        info = lab.up(adopt=not args.no_adopt)
    except (LabError, DiskError) as exc:
        raise UsageError(str(exc)) from None
    print(summary(info), flush=True)
    return lab.wait()


def _down(args: argparse.Namespace) -> int:
    from opie.lab.runner import LabError, down
    try:
        pids = down(args.dir)
    except LabError as exc:
        raise OpieError(str(exc)) from None
    print(f"stopped {len(pids)} process(es)" if pids else "nothing was running")
    return 0


def _status(args: argparse.Namespace) -> int:
    from opie.lab.runner import _alive, read_lab
    lab = read_lab(args.dir)
    if lab is None:
        raise OpieError(f"no lab in {args.dir}")
    for isu in lab.get("isus", []):
        isu["alive"] = _alive(isu["pid"])
    if args.json:
        print(json.dumps(lab, indent=2))
    else:
        for isu in lab.get("isus", []):
            print(f"{isu['name']:<6} {isu['uuid']}  pid {isu['pid']:<7} {'up' if isu['alive'] else 'DOWN'}  "
                  f"{' '.join(isu['exports'])}")
    return 0
