"""`opie ha status` and `opie ha switchover`: the active/passive heads (head/ha)."""
from __future__ import annotations

import argparse
import json
import time

from opie.cli.errors import OpieError
from opie.cli.headapi import add_head_options, api, call

SWITCHOVER_WAIT = 30.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ha", help="active/passive heads: status and switchover",
                       description="Two heads share the cluster: one ACTIVE (it serves the array, the "
                                   "volumes and the shares, on the service address) and one PASSIVE (it "
                                   "keeps a warm copy of the mapping table and takes over when the active "
                                   "fails). The active is chosen by a leased key in etcd; its EPOCH (the "
                                   "key's create revision) only grows, and the ISUs refuse every older one.")
    hs = p.add_subparsers(dest="ha_command", metavar="SUBCOMMAND", required=True)
    st = hs.add_parser(
        "status", help="this head's HA role, the epoch, the leader and the last failover",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Show the HA state of the head reached by --head (any of the two):\n"
                     "  role        active, passive, or stopped (not in the election)\n"
                     "  epoch       the active's epoch (the ISUs refuse older ones)\n"
                     "  leader      the active head's name, as etcd has it\n"
                     "  lease left  seconds before the active's lease could expire (active only)\n"
                     "  mirror      the mapping-table mirror: the active's sender (current or\n"
                     "              stale) and the passive's copy (pool, transaction)\n"
                     "  unfenced    ISUs that missed the last fence (their members stay out)\n"
                     "  failover    the last takeover's timeline: each step and its seconds\n"
                     "Exits 1 if the head cannot be reached or has HA off."),
        epilog="example: opie ha status --head http://10.0.0.2:8080 --token-file /var/lib/opie/head/api-token")
    st.add_argument("--json", action="store_true", help="machine-readable output (GET /v1/ha as is)")
    add_head_options(st)
    st.set_defaults(func=_status)
    sw = hs.add_parser(
        "switchover", help="planned handover from the active head to the passive one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Ask the active head (reached by --head) to hand over: it releases the\n"
                     "service address, stops its shares, exports and mounts, flushes and closes\n"
                     "the pool and the array (clean: nothing to resync), then resigns. The\n"
                     "passive wins the election at a larger epoch and takes over. Waits (at most\n"
                     "--wait seconds) until the old active names the new one. Exits 1 if the head\n"
                     "is not active or no new active appears in time."),
        epilog="example: opie ha switchover --head http://10.0.0.2:8080 --token-file /var/lib/opie/head/api-token")
    sw.add_argument("--wait", type=float, default=SWITCHOVER_WAIT, metavar="SECONDS",
                    help=f"how long to wait for the new active (default {SWITCHOVER_WAIT:g})")
    sw.add_argument("--json", action="store_true", help="machine-readable output")
    add_head_options(sw)
    sw.set_defaults(func=_switchover)


def _status(args: argparse.Namespace) -> int:
    st = call(args, "GET", "/v1/ha")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    if not st.get("enabled"):
        raise OpieError(f"HA is off on head {st.get('name')} (head.json has no 'ha' section)")
    left = st.get("lease_left")
    print(f"head {st['name']}  {st['role'].upper()}  epoch {st.get('epoch')}  leader {st.get('leader') or '-'}"
          + (f"  lease left {left:.2f} s" if left is not None and st["role"] == "active" else ""))
    if st.get("service_address"):
        print(f"  service address {st['service_address']}")
    m = st.get("mirror") or {}
    copy = m.get("copy")
    print(f"  mirror: sender {m.get('sender') or '-'} -> {m.get('peer') or '-'};  copy "
          + (f"pool {copy['pool']} at transaction {copy['seq']}" if copy else "none"))
    for isu, why in (st.get("unfenced") or {}).items():
        print(f"  unfenced ISU {isu}: {why}")
    tl = st.get("timeline") or st.get("cluster_failover")
    if tl:
        print(f"  last failover: {tl['head']} at epoch {tl['epoch']}, {tl['seconds']:.3f} s")
        for s in tl["steps"]:
            extra = {k: v for k, v in s.items() if k not in ("step", "seconds")}
            print(f"    {s['step']:<12} {s['seconds']:8.3f} s" + (f"  {json.dumps(extra)}" if extra else ""))
    return 0


def _switchover(args: argparse.Namespace) -> int:
    from opie.head.apiclient import APIError
    done = call(args, "POST", "/v1/ha/switchover")
    client = api(args)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        try:
            st = client.call("GET", "/v1/ha")
        except APIError:
            st = {}
        leader = st.get("leader")
        if leader and leader != done["resigned"] and (st.get("epoch") or 0) > done["epoch"]:
            out = {**done, "active": leader, "new_epoch": st["epoch"]}
            print(json.dumps(out) if args.json else
                  f"{done['resigned']} resigned at epoch {done['epoch']}; {leader} is active at epoch {st['epoch']}")
            return 0
        time.sleep(0.2)
    raise OpieError(f"{done['resigned']} resigned at epoch {done['epoch']}, but no new active head "
                    f"within {args.wait:g} s")
