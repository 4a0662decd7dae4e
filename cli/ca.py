"""`opie ca ...`: the cluster certificate authority."""
from __future__ import annotations

import argparse

from opie.cli.errors import OpieError
from opie.nbd import tls


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ca", help="cluster certificate authority (TLS for NBD)",
                       description="Create the cluster CA and issue host certificates in the "
                                   "directory layout nbdkit, libnbd and qemu expect.")
    ca_sub = p.add_subparsers(dest="ca_command", metavar="SUBCOMMAND", required=True)
    c = ca_sub.add_parser("create", help="create a cluster CA (ca-cert.pem, ca-key.pem)",
                          description="Create a new cluster CA in DIR. Refuses to replace an existing one. "
                                      "DIR also gets certificates of role admin for this host (an "
                                      "operator's tools such as nbdinfo; not a head).")
    c.add_argument("dir", metavar="DIR")
    c.add_argument("--name", default="Opie cluster CA", help="the CA's common name")
    c.set_defaults(func=_create)
    i = ca_sub.add_parser(
        "issue", help="issue server and client certificates for a host",
        description="Issue server-cert.pem/server-key.pem and client-cert.pem/client-key.pem signed by "
                    "the CA in CA_DIR into OUT_DIR (with a copy of ca-cert.pem). OUT_DIR then works as "
                    "--tls-dir for opie and as ?tls-certificates=OUT_DIR for nbdinfo/nbdcopy. "
                    "The certificates carry a role: only a head's may adopt (and later fence) ISUs.")
    i.add_argument("ca_dir", metavar="CA_DIR")
    i.add_argument("out_dir", metavar="OUT_DIR")
    i.add_argument("--san", action="append", default=None, metavar="NAME",
                   help="server name or IP for the certificate (repeatable; default: localhost, "
                        "127.0.0.1, ::1 and the hostname)")
    i.add_argument("--client-name", default=None, help="common name of the client certificate")
    i.add_argument("--role", choices=tls.ROLES, default=tls.DEFAULT_ROLE,
                   help=f"what the host is: head (may adopt and fence ISUs), isu (a storage node) or "
                        f"admin (an operator's tools); default {tls.DEFAULT_ROLE}")
    i.add_argument("--force", action="store_true", help="replace existing certificates in OUT_DIR")
    i.set_defaults(func=_issue)


def _create(args: argparse.Namespace) -> int:
    try:
        d = tls.create_ca(args.dir, name=args.name)
        tls.issue(d, d, role="admin")
    except (FileExistsError, OSError) as exc:
        raise OpieError(str(exc)) from None
    print(f"cluster CA created in {d} (server and client certificates for this host issued there too)")
    return 0


def _issue(args: argparse.Namespace) -> int:
    try:
        out = tls.issue(args.ca_dir, args.out_dir, server_names=args.san,
                        client_name=args.client_name, role=args.role, force=args.force)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise OpieError(f"cannot issue certificates: {exc}") from None
    print(f"{args.role} certificates issued in {out}")
    return 0
