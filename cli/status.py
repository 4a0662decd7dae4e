"""`opie status`: the array, volumes, snapshots and running jobs."""
from __future__ import annotations

import argparse
import json

from opie.cli.headapi import add_head_options, call


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show array, volumes, snapshots and jobs",
                       description="Show the head's view: the array state string (one character per "
                                   "member: U in sync, _ failed or missing), members, rebuild/resync/scrub "
                                   "progress, volumes with used and free space, snapshots and jobs.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_head_options(p)
    p.set_defaults(func=_status)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _status(args: argparse.Namespace) -> int:
    st = call(args, "GET", "/v1/status")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    a = st["array"]
    print(f"array {a['name']}  [{a['state']}]  {human_bytes(a['size'])}  chunk {a['chunk_size'] // 1024} KiB"
          + (f"  FAILED: {a['failed']}" if a.get("failed") else ""))
    for m in a["members"]:
        print(f"  role {m['role']}  {m['state']:<11} {m['name']}")
    for kind, ph in (a.get("progress") or {}).items():
        print(f"  {kind}: {ph['state']} {ph['fraction'] * 100:.1f}% ({ph['done']}/{ph['total']} stripes)")
    if a.get("last_scrub"):
        print(f"  last scrub: {a['last_scrub']}")
    pool = st["pool"]
    print(f"pool: {json.dumps(pool)}")
    for v in st["volumes"]:
        fs = v.get("filesystem") or {}
        used = f"  fs used {human_bytes(fs['used'])} of {human_bytes(fs['size'])}" if fs.get("size") else ""
        print(f"volume {v['name']}  {human_bytes(v['size'])}  mapped {human_bytes(v['mapped_bytes'])}"
              f"  {v['mountpoint'] or '(not mounted)'}{used}")
        print(f"  export {v['export']}")
        for s in v["snapshots"]:
            print(f"  snapshot {s['name']}  taken {s.get('created')}")
    for j in st["jobs"]:
        print(f"job {j['id']} {j['kind']} {j['subject']}: {j['state']} {j['progress'] * 100:.0f}%"
              + (f" ({j['error']})" if j.get("error") else ""))
    return 0
