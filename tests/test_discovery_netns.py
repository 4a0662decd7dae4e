"""Discovery end to end on lab hosts in network namespaces.

Topology: h0 = head (lease server + ISU registry), h1..h4 = ISUs that start
without an address, h5 = a hand-configured box holding the first pool
address and running avahi-daemon + avahi-browse as an independent browser.

Must hold: every ISU gets a distinct pool address (never the one h5 answers
ARP for), applies it and persists it; the head discovers all four with the
right class (new / member / spare / foreign); avahi-browse sees them with
their TXT; a TXT state change reaches the head within 1 s; forged, malformed,
out-of-pool and duplicate-UUID lease messages are refused, logged, and leave
the leases file byte-for-byte unchanged; a SIGKILLed ISU is declared dead
within 3 s while the others stay alive; a goodbye is seen at once; a
restarted head rediscovers the live ISUs (not the dead one) and goes on
renewing their leases from the persisted file.

The stand-in ISU and head processes are this file run as a script
(`python test_discovery_netns.py isu|head ...`); the real ISU agent and head
daemon plug the same modules in.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SUBNET = "10.213.77.0/24"
POOL = "10.213.77.100-10.213.77.120"
HAND_CONFIGURED = "10.213.77.100"
CLUSTER = "cluster-a"
TOKEN = bytes.fromhex("5eed" * 16)


def emit(ev: str, **fields: Any) -> None:
    print(json.dumps({"ev": ev, "t": time.time(), **fields}), flush=True)


def isu_main(args: argparse.Namespace) -> None:
    """Stand-in ISU: lease an address, renew it, announce with heartbeat, obey stdin."""
    from opie.discovery.presence import IsuPresence
    from opie.isu.addressing import LeaseClient

    client = LeaseClient("eth0", bytes.fromhex(args.token), args.state_dir)
    uuid = client.uuid
    emit("hello")
    lease = client.acquire(timeout=15)
    emit("leased", address=str(lease.address), expires=lease.expires)
    renewed = client.renew()
    emit("renewed", address=str(renewed.address), expires=renewed.expires)
    stop = threading.Event()
    presence = IsuPresence(str(uuid), str(lease.address.ip), 10809, state="ready", disks=2,
                           capacity=2 * 10**9, version="0.1.0", config_gen=1,
                           cluster=args.cluster, role=args.role, name=args.name)
    emit("announcing")
    presence.start()
    emit("announced")
    try:
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["state"]:
                emit("updating", state=words[1])
                presence.update(state=words[1], config_gen=presence.record.config_gen + 1)
            elif words[:1] == ["keep"]:
                threading.Thread(target=client.keep, args=(renewed, stop), daemon=True).start()
            elif words[:1] == ["quit"]:
                break
    finally:
        stop.set()
        presence.close()


def head_main(args: argparse.Namespace) -> None:
    """Stand-in head: lease server with ARP probing plus the ISU registry; events on stdout."""
    from opie.discovery.arp import arp_probe
    from opie.discovery.lease_pool import LeasePool, parse_pool
    from opie.discovery.lease_server import LeaseServer
    from opie.discovery.registry import IsuRegistry, RegistryEvent

    def on_event(event: RegistryEvent) -> None:
        emit(event.kind, uuid=event.uuid, cls=event.isu_class.value, state=event.record.state,
             address=event.record.address, at=event.at)

    pool = LeasePool(args.leases, parse_pool(args.pool), 24, lease_secs=int(args.lease_secs),
                     probe=lambda a: arp_probe("eth0", a))
    with LeaseServer(pool, bytes.fromhex(args.token), "eth0", head=(args.address, 8080)), \
            IsuRegistry(args.address, args.cluster, on_event):
        emit("ready")
        sys.stdin.read()


def forger_main(args: argparse.Namespace) -> None:
    """Send hostile lease messages from an addressed host; print the NAKs that come back."""
    import select

    from opie.discovery.lease_proto import (LEASE_SERVER_PORT, Kind, LeaseMessage, LeaseProtocolError,
                                       decode, encode)
    from opie.discovery.netutil import broadcast_socket

    token = bytes.fromhex(args.token)
    dup = uuidlib.UUID(args.dup_uuid)
    hello = LeaseMessage(Kind.HELLO, 1, uuidlib.uuid4(), "02:00:00:00:00:01")
    out_of_pool = LeaseMessage(Kind.REQUEST, 2, uuidlib.uuid4(), "02:00:00:00:00:02",
                               ipaddress.IPv4Address("10.213.77.200"), 24)
    duplicate = LeaseMessage(Kind.HELLO, 3, dup, "02:00:00:00:00:03")
    signed = encode(hello, token)
    datagrams = [encode(hello, b"not the cluster token"),       # forged
                 signed[:-1] + bytes([signed[-1] ^ 0xFF]),      # tag damaged (zeroing its last
                                                                # byte left 1 in 256 tags valid)
                 b"OPLS\x01garbage",                            # malformed
                 encode(out_of_pool, token), encode(duplicate, token)]
    with broadcast_socket("eth0", 7868) as sock:
        for data in datagrams:
            sock.sendto(data, ("255.255.255.255", LEASE_SERVER_PORT))
        deadline = time.monotonic() + 3
        while (left := deadline - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                try:
                    msg = decode(sock.recv(2048), token)
                except LeaseProtocolError:
                    continue
                if msg.kind is Kind.NAK and msg.xid in (2, 3):
                    emit("nak", xid=msg.xid, reason=msg.reason.name)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role_", required=True)
    p = sub.add_parser("isu")
    for opt in ("--token", "--state-dir", "--cluster", "--role", "--name"):
        p.add_argument(opt, default="")
    p = sub.add_parser("head")
    for opt in ("--address", "--token", "--leases", "--pool", "--cluster", "--lease-secs"):
        p.add_argument(opt, required=True)
    p = sub.add_parser("forger")
    for opt in ("--token", "--dup-uuid"):
        p.add_argument(opt, required=True)
    ns = parser.parse_args()
    {"isu": isu_main, "head": head_main, "forger": forger_main}[ns.role_](ns)
    sys.exit(0)


import pytest  # noqa: E402  (not needed by the stand-in processes above)

from opie.discovery.lease_pool import load_leases, parse_pool  # noqa: E402
from opie.isu import identity  # noqa: E402
from opie.isu.addressing import read_network  # noqa: E402
from opie.lab.netns import LabHost, LabNetwork, lab_namespaces  # noqa: E402

log = logging.getLogger(__name__)
HERE = os.path.abspath(__file__)


class Proc:
    """A stand-in process with its stdout JSON events and stderr lines collected by threads."""

    def __init__(self, host: LabHost, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = host.popen([sys.executable, HERE] + argv, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first event (already seen or new) matching `pred`; fails after `timeout` s."""
        for ev in self.seen:
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(ev)
            if pred(ev):
                return ev
        tail = "\n".join(self.stderr[-20:])
        raise AssertionError(f"no matching event within {timeout} s; seen {self.seen[-10:]}\n{tail}")

    def drain(self) -> None:
        """Move every event received so far into `seen`."""
        while not self.events.empty():
            self.seen.append(self.events.get())

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


AVAHI_CONF = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces=eth0
[publish]
disable-publishing=yes
"""

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/> <allow own="*"/>
    <allow send_type="method_call"/> <allow send_type="signal"/>
    <allow send_type="method_return"/> <allow send_type="error"/>
    <allow receive_type="method_call"/> <allow receive_type="signal"/>
    <allow receive_type="method_return"/> <allow receive_type="error"/>
  </policy>
</busconfig>
"""


def start_avahi(host: LabHost, state: Path) -> dict[str, str]:
    """A private system bus and avahi-daemon in `host`; returns the env for avahi-browse."""
    bus_path = state / "bus"
    (state / "bus.conf").write_text(BUS_CONF.format(path=bus_path))
    (state / "avahi.conf").write_text(AVAHI_CONF)
    bus = host.popen(["dbus-daemon", f"--config-file={state / 'bus.conf'}", "--nofork",
                      "--print-address=1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert bus.stdout is not None and bus.stdout.readline().startswith("unix:")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={bus_path}")
    with open(state / "avahi.log", "w") as avahi_log:
        host.popen(["avahi-daemon", "-f", str(state / "avahi.conf"), "--no-drop-root", "--no-chroot",
                    "--no-rlimits", "--no-proc-title"], env=env, stdout=avahi_log, stderr=subprocess.STDOUT)
    return env


@pytest.fixture
def lab() -> Iterator[LabNetwork]:
    net = LabNetwork(hosts=6, subnet=SUBNET, addressed=[0, 5])
    with net:
        yield net
    assert lab_namespaces(net.prefix) == []


def test_isus_lease_announce_and_are_watched(lab: LabNetwork, tmp_path: Path) -> None:
    head_host, box = lab.host(0), lab.host(5)
    with box.ipr() as ipr:   # a box somebody configured by hand inside the pool
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=HAND_CONFIGURED, prefixlen=24)
    leases = tmp_path / "leases.json"
    head_argv = ["head", "--address", str(head_host.address.ip), "--token", TOKEN.hex(),
                 "--leases", str(leases), "--pool", POOL, "--cluster", CLUSTER, "--lease-secs", "4"]
    head = Proc(head_host, head_argv)
    head.wait_for(lambda e: e["ev"] == "ready", 15)
    avahi_env = start_avahi(box, tmp_path)

    roles = [("", ""), (CLUSTER, "member"), (CLUSTER, "spare"), ("cluster-b", "member")]
    expected = ["new", "member", "spare", "foreign"]
    isus: dict[str, Proc] = {}
    configs: dict[str, Path] = {}  # state dirs
    for i, (cluster, role) in enumerate(roles, start=1):
        state_dir = tmp_path / f"isu{i}"
        u = identity.load(state_dir)["uuid"]
        configs[u] = state_dir
        isus[u] = Proc(lab.host(i), ["isu", "--token", TOKEN.hex(), "--state-dir", str(state_dir), "--cluster", cluster, "--role", role,
                                     "--name", f"isu{i}"])
    uuids = list(isus)

    found = {u: head.wait_for(lambda e, u=u: e["ev"] == "found" and e["uuid"] == u, 30) for u in uuids}
    pool = {str(a) for a in parse_pool(POOL)}
    addresses = set()
    for i, u in enumerate(uuids, start=1):
        leased = isus[u].wait_for(lambda e: e["ev"] == "leased", 1)
        renewed = isus[u].wait_for(lambda e: e["ev"] == "renewed", 1)
        address = ipaddress.IPv4Interface(leased["address"])
        assert str(address.ip) in pool and str(address.ip) != HAND_CONFIGURED
        assert renewed["address"] == leased["address"] and renewed["expires"] >= leased["expires"]
        assert lab.host(i).addresses() == [address]
        persisted = read_network(str(configs[u]))
        assert (persisted.address, persisted.source) == (str(address), "lease")
        assert persisted.head == f"{head_host.address.ip}:8080"
        assert found[u]["address"] == str(address.ip) and found[u]["cls"] == expected[i - 1]
        addresses.add(str(address.ip))
        hello_t = isus[u].wait_for(lambda e: e["ev"] == "hello", 1)["t"]
        announce_t = isus[u].wait_for(lambda e: e["ev"] == "announcing", 1)["t"]
        print(f"isu{i} {address}: lease {leased['t'] - hello_t:.3f} s, "
              f"announce->found {found[u]['at'] - announce_t:.3f} s ({found[u]['cls']})")
    assert len(addresses) == 4
    assert {lease.uuid: lease.address for lease in load_leases(str(leases))} == {
        u: isus[u].wait_for(lambda e: e["ev"] == "leased", 1)["address"].split("/")[0] for u in uuids}

    # An independent browser (avahi) sees all four with their TXT.
    browse = box.popen(["avahi-browse", "-rtp", "_opie-isu._tcp"], env=avahi_env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = browse.communicate(timeout=30)
    resolved = {}
    for line in out.splitlines():
        fields = line.split(";")
        if fields[0] == "=":
            txt = dict(kv.strip('"').split("=", 1) for kv in fields[9].split('" "'))
            resolved[txt["uuid"]] = (fields[7], txt)
    assert set(resolved) == set(uuids), (out, err)
    for u in uuids:
        assert resolved[u][0] == found[u]["address"]
        assert resolved[u][1]["state"] == "ready" and resolved[u][1]["disks"] == "2"

    # A TXT change reaches the head within 1 s.
    isus[uuids[0]].send("state degraded")
    sent = isus[uuids[0]].wait_for(lambda e: e["ev"] == "updating", 5)["t"]
    changed = head.wait_for(lambda e: e["ev"] == "changed" and e["uuid"] == uuids[0]
                            and e["state"] == "degraded", 5)
    print(f"TXT state change seen by the head after {changed['at'] - sent:.3f} s")
    assert changed["at"] - sent < 1.0

    # Hostile lease traffic: refused, logged, leases file unchanged.
    before = leases.read_bytes()
    refusals_before = sum("refused" in line for line in head.stderr)
    forger = Proc(box, ["forger", "--token", TOKEN.hex(), "--dup-uuid", uuids[1]])
    naks = {forger.wait_for(lambda e: e["ev"] == "nak" and e["xid"] == x, 10)["reason"] for x in (2, 3)}
    assert naks == {"OUT_OF_POOL", "DUPLICATE_UUID"}
    deadline = time.monotonic() + 5
    while sum("refused" in line for line in head.stderr) - refusals_before < 5:
        assert time.monotonic() < deadline, head.stderr[-10:]
        time.sleep(0.05)
    assert leases.read_bytes() == before

    # From here on the ISUs renew their 4 s leases at half-life.
    for proc in isus.values():
        proc.send("keep")

    # SIGKILL of one ISU is noticed within 3 s; the others stay alive.
    victim = uuids[2]
    killed_at = time.time()
    os.kill(isus[victim].proc.pid, signal.SIGKILL)
    dead = head.wait_for(lambda e: e["ev"] == "dead" and e["uuid"] == victim, 5)
    print(f"SIGKILLed ISU declared dead after {dead['at'] - killed_at:.3f} s")
    assert dead["at"] - killed_at < 3.0
    time.sleep(0.5)
    head.drain()
    assert [e["uuid"] for e in head.seen if e["ev"] == "dead"] == [victim]

    # A clean shutdown says goodbye: the head drops the ISU at once.
    isus[uuids[3]].send("quit")
    head.wait_for(lambda e: e["ev"] == "gone" and e["uuid"] == uuids[3], 5)

    # A restarted head finds the live ISUs from discovery alone, not the dead one,
    # and keeps renewing their leases from the persisted leases file.
    head.proc.terminate()
    head.proc.wait(10)
    head = Proc(head_host, head_argv)
    ready = head.wait_for(lambda e: e["ev"] == "ready", 15)["t"]
    for u in uuids[:2]:
        again = head.wait_for(lambda e, u=u: e["ev"] == "found" and e["uuid"] == u, 10)
        print(f"restarted head found {u[:8]} after {again['at'] - ready:.3f} s")
    deadline = time.monotonic() + 8
    while True:
        expiry = {x.uuid: x.expires for x in load_leases(str(leases))}
        if all(expiry[u] > ready + 4 for u in uuids[:2]):
            break
        assert time.monotonic() < deadline, (expiry, ready)
        time.sleep(0.2)
    time.sleep(1.0)
    head.drain()
    assert {e["uuid"] for e in head.seen if e["ev"] == "found"} == set(uuids[:2])
