"""Shared CLI plumbing for commands that talk to the head's API."""
from __future__ import annotations

import argparse
import sys
import time

from opie.cli.errors import OpieError, UsageError


def add_head_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reaching the head")
    g.add_argument("--head", metavar="URL", help="head API URL (default: $OPIE_HEAD, else the lab's)")
    g.add_argument("--token-file", metavar="FILE", help="API token file (default: $OPIE_TOKEN_FILE, else the lab's)")
    g.add_argument("--lab", metavar="DIR", help="lab directory whose lab.json names the head "
                                                "(default: $OPIE_LAB or /var/tmp/opie-lab)")


def api(args: argparse.Namespace):
    from opie.head.apiclient import APIError, HeadAPI
    try:
        return HeadAPI.locate(args.head, args.token_file, args.lab)
    except APIError as exc:
        raise OpieError(str(exc)) from None


def call(args: argparse.Namespace, method: str, path: str, body=None):
    from opie.head.apiclient import APIError
    try:
        return api(args).call(method, path, body)
    except APIError as exc:
        if exc.status == 400:
            raise UsageError(str(exc)) from None
        raise OpieError(str(exc)) from None


def follow(args: argparse.Namespace, job: dict, quiet: bool = False) -> dict:
    """Poll a job until it ends, showing progress on stderr; return the job."""
    from opie.head.apiclient import APIError
    client = api(args)
    tty = sys.stderr.isatty()
    last = None
    while job["state"] in ("queued", "running"):
        if not quiet:
            line = f"{job['kind']} {job['subject']}: {job['progress'] * 100:5.1f}% {job['message']}"
            if tty:
                print("\r" + line.ljust(78), end="", file=sys.stderr, flush=True)
            elif line != last:
                print(line, file=sys.stderr, flush=True)
            last = line
        time.sleep(0.5)
        try:
            job = client.job(job["id"])
        except APIError as exc:
            raise OpieError(f"lost track of job {job['id']}: {exc}") from None
    if tty and not quiet:
        print(file=sys.stderr)
    if job["state"] == "failed":
        raise OpieError(f"{job['kind']} of {job['subject']} failed: {job['error']}")
    return job
