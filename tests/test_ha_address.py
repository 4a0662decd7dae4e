"""The service address moves between heads, and the old active's clients are reset.

Topology (network namespaces on one bridge): h0 = "old" (the active that
holds the service address first), h1 = "new" (the head that takes over),
h2 = "client". A small TCP server on the service address stands in for smbd.

Must hold: the client's connection to "old" is listed with its exact
4-tuple; after the address moves (removed on old, added on new, gratuitous
ARP) the client's neighbour entry names new's MAC; the tickle from "new"
makes the client's blocked read fail with ECONNRESET within 2 s; a new
connection from the client reaches the server on "new". Adding the address
twice or removing a missing one is harmless, on eth0 and (as in the loopback
lab) on lo. Pure tests pin the tickle packet and the /proc/net/tcp parser
to literal bytes.

The head-side steps and the client run as this file in script mode
(`python test_ha_address.py take|release|list|reset|serve|client ...`)
inside a lab host, as the head daemon will run them in its own namespace.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import socket
import sys
import threading
import time


def emit(ev: str, **fields: object) -> None:
    print(json.dumps({"ev": ev, "t": time.time(), **fields}), flush=True)


def head_main(args: argparse.Namespace) -> None:
    """One head-side step, run to completion; its result as one JSON line."""
    from opie.head.ha import connections
    from opie.head.ha.address import ServiceAddress

    if args.cmd in ("take", "release"):
        vip = ServiceAddress.parse(args.ifname, args.vip)
        if args.cmd == "take":
            added = vip.add()
            emit("took", added=added, announced=vip.announce(), present=vip.present())
        else:
            emit("released", removed=vip.release(), present=vip.present())
    elif args.cmd == "list":
        found = connections.client_connections(ipaddress.IPv4Address(args.vip), args.ports)
        emit("listed", connections=json.loads(connections.encode(found)))
    else:   # reset
        conns = connections.decode(sys.stdin.read())
        emit("tickling")
        emit("tickled", sent=connections.reset_connections(conns))


def serve_main(args: argparse.Namespace) -> None:
    """A server on VIP:PORT that answers each line with 'pong from NAME' and keeps the connection."""
    srv = socket.create_server((args.vip, args.port))
    emit("listening")

    def answer(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for _ in f:
                f.write(f"pong from {args.name}\n".encode())
                f.flush()

    while True:
        conn, peer = srv.accept()
        emit("accepted", peer=list(peer))
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def ping(vip: str, port: int) -> tuple[socket.socket, str]:
    sock = socket.create_connection((vip, port), timeout=5)
    sock.sendall(b"ping\n")
    return sock, sock.makefile("rb").readline().decode().strip()


def client_main(args: argparse.Namespace) -> None:
    """Connect and ping; then block reading until the connection fails; on 'again' connect anew."""
    sock, reply = ping(args.vip, args.port)
    emit("connected", local=list(sock.getsockname()), reply=reply)
    sock.settimeout(30)
    try:
        data = sock.recv(1)
        emit("lost", error="EOF" if not data else "data")
    except OSError as exc:
        emit("lost", error=errno.errorcode.get(exc.errno or 0, str(exc)))
    for line in sys.stdin:
        if line.strip() == "again":
            again, reply = ping(args.vip, args.port)
            emit("reconnected", local=list(again.getsockname()), reply=reply)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("take", "release"):
        p = sub.add_parser(cmd)
        p.add_argument("ifname")
        p.add_argument("vip")
    p = sub.add_parser("list")
    p.add_argument("vip")
    p.add_argument("ports", type=int, nargs="+")
    sub.add_parser("reset")
    for cmd in ("serve", "client"):
        p = sub.add_parser(cmd)
        p.add_argument("vip")
        p.add_argument("port", type=int)
        p.add_argument("--name", default="")
    ns = parser.parse_args()
    {"serve": serve_main, "client": client_main}.get(ns.cmd, head_main)(ns)
    sys.exit(0)


import os  # noqa: E402  (not needed by the script above)
import queue  # noqa: E402
import subprocess  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from opie.discovery.arp import announce_frame, probe_frame  # noqa: E402
from opie.head.errors import ServiceAddressError  # noqa: E402
from opie.head.ha.address import ServiceAddress  # noqa: E402
from opie.head.ha.connections import ClientConnection, decode, encode, parse_proc_net_tcp  # noqa: E402
from opie.head.ha.tickle import checksum, tickle_packet  # noqa: E402
from opie.lab.netns import LabHost, LabNetwork, lab_namespaces  # noqa: E402
from scenario_support import wait_until  # noqa: E402

HERE = os.path.abspath(__file__)
SUBNET = "10.213.91.0/24"
VIP = "10.213.91.100"
PORT = 4450       # the configured SMB port
NFS_PORT = 2049
A = ipaddress.IPv4Address


# -- pure ----------------------------------------------------------------

def test_checksum_of_a_textbook_ipv4_header() -> None:
    # The header used to explain the Internet checksum; its checksum field is b861.
    header = bytes.fromhex("45000073000040004011" "0000" "c0a80001c0a800c7")
    assert checksum(header) == 0xB861
    assert checksum(header[:10] + b"\xb8\x61" + header[12:]) == 0


def test_tickle_packet_is_literal() -> None:
    # Checksums worked by hand: IP 0x4500+0x0028+0x4000+0x4006+0x0ad5+0x5b64+0x0ad5+0x5b03
    # = 0x1913f -> 0x9140 -> ~ 0x6ebf; TCP over the pseudo-header (addresses, 6, 20) and
    # header 01bd c822 0..0 5010 04d2 = 0x1eaec -> 0xeaed -> ~ 0x1512.
    packet = tickle_packet(A("10.213.91.100"), 445, A("10.213.91.3"), 51234)
    assert packet == bytes.fromhex(
        "4500" "0028" "0000" "4000" "4006" "6ebf" "0ad55b64" "0ad55b03"     # IPv4, DF, TCP
        "01bd" "c822" "00000000" "00000000" "5010" "04d2" "1512" "0000")    # 445 -> 51234, seq=ack=0, ACK
    pseudo = packet[12:20] + bytes([0, 6, 0, 20])
    assert checksum(pseudo + packet[20:]) == 0 and checksum(packet[:20]) == 0


def test_gratuitous_arp_frame_is_literal() -> None:
    mac = bytes.fromhex("020000000001")
    assert announce_frame(mac, A(VIP)) == bytes.fromhex(
        "ffffffffffff" "020000000001" "0806"                  # broadcast, from mac, ARP
        "0001" "0800" "06" "04" "0001"                        # Ethernet/IPv4, request
        "020000000001" "0ad55b64" "000000000000" "0ad55b64")  # sender = target = the address
    assert probe_frame(mac, A(VIP))[22:] == bytes.fromhex("020000000001" "00000000" "000000000000" "0ad55b64")


def test_proc_net_tcp_lines_parse_to_ends() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 645BD50A:1162 035BD50A:C822 01 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        "   1: 645BD50A:1162 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1\n")
    v6 = (
        "  sl  local_address                         remote_address                        st\n"
        "   0: 0000000000000000FFFF0000645BD50A:0801 0000000000000000FFFF0000035BD50A:D000 01 0\n"
        "   1: 00000000000000000000000001000000:0801 00000000000000000000000001000000:D001 01 0\n")
    # the literals are in a little-endian host's byte order, as /proc prints them on
    # every kind of machine this project runs on (x86_64, aarch64)
    assert list(parse_proc_net_tcp(text)) == [
        (1, (A(VIP), 4450), (A("10.213.91.3"), 51234)), (10, (A(VIP), 4450), (A("0.0.0.0"), 0))]
    assert list(parse_proc_net_tcp(v6)) == [(1, (A(VIP), 2049), (A("10.213.91.3"), 53248))]


def test_connection_list_round_trips_and_refuses_bad_text() -> None:
    conns = [ClientConnection(A(VIP), PORT, A("10.213.91.3"), 51234),
             ClientConnection(A(VIP), NFS_PORT, A("10.213.91.4"), 700)]
    text = encode(conns)
    assert json.loads(text)[1] == {"server": f"{VIP}:{PORT}", "client": "10.213.91.3:51234"}
    assert decode(text) == sorted(conns)
    for bad in ("{", "{}", '[{"server": "x:1", "client": "10.0.0.1:2"}]',
                f'[{{"server": "{VIP}:0", "client": "10.0.0.1:2"}}]', '[{"server": "1.2.3.4:5"}]'):
        with pytest.raises(ServiceAddressError):
            decode(bad)


def test_missing_interface_is_refused() -> None:
    vip = ServiceAddress.parse("opie-nosuch0", VIP)
    for step in (vip.add, vip.remove, vip.present):
        with pytest.raises(ServiceAddressError, match="opie-nosuch0: no such interface"):
            step()
    with pytest.raises(ServiceAddressError):
        ServiceAddress.parse("eth0", "10.213.91.100/24")


# -- network namespaces ----------------------------------------------------

class Script:
    """This file in script mode in a lab host; its JSON events read by a thread."""

    def __init__(self, host: LabHost, argv: list[str]) -> None:
        self.proc = host.popen([sys.executable, HERE, *argv], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def next(self, ev: str, timeout: float = 10) -> dict[str, Any]:
        """The next event, which must be `ev`, within `timeout` s."""
        got = self.events.get(timeout=timeout)
        assert got["ev"] == ev, got
        return got

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def step(host: LabHost, *argv: str, stdin: str = "") -> list[dict[str, Any]]:
    """Run one head-side step in `host`; its events (fails on a non-zero exit)."""
    proc = host.popen([sys.executable, HERE, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(stdin, timeout=30)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def neighbour_mac(host: LabHost, address: str) -> str | None:
    """`host`'s neighbour entry (MAC) for `address`, or None."""
    with host.ipr() as ipr:
        for msg in ipr.neigh("dump", family=socket.AF_INET):
            if msg.get_attr("NDA_DST") == address:
                return msg.get_attr("NDA_LLADDR")
    return None


@pytest.fixture
def lab() -> Iterator[LabNetwork]:
    net = LabNetwork(hosts=3, subnet=SUBNET, stop_grace=1.0)
    with net:
        yield net
    assert lab_namespaces(net.prefix) == []


def test_address_moves_and_the_old_clients_are_reset(lab: LabNetwork) -> None:
    old, new, client_host = lab.host(0), lab.host(1), lab.host(2)
    client_ip = str(client_host.address.ip)
    # The address on old, taken twice: the second take adds nothing and still announces.
    assert [e["added"] for e in step(old, "take", "eth0", VIP) + step(old, "take", "eth0", VIP)] == [True, False]
    assert old.addresses().count(ipaddress.IPv4Interface(f"{VIP}/32")) == 1
    Script(old, ["serve", VIP, str(PORT), "--name", "old"]).next("listening")

    client = Script(client_host, ["client", VIP, str(PORT)])
    connected = client.next("connected")
    assert connected["reply"] == "pong from old" and connected["local"][0] == client_ip
    assert neighbour_mac(client_host, VIP) == old.mac
    (listed,) = step(old, "list", VIP, str(PORT), str(NFS_PORT))
    published = listed["connections"]
    assert published == [{"server": f"{VIP}:{PORT}", "client": f"{client_ip}:{connected['local'][1]}"}]

    # Move: removed on old (twice: the second is harmless), added and announced on new.
    assert [e["removed"] for e in step(old, "release", "eth0", VIP) + step(old, "release", "eth0", VIP)] \
        == [True, False]
    assert ipaddress.IPv4Interface(f"{VIP}/32") not in old.addresses()
    (took,) = step(new, "take", "eth0", VIP)
    assert took == {**took, "added": True, "announced": True, "present": True}
    wait_until(lambda: neighbour_mac(client_host, VIP) == new.mac, 1.0, "client's neighbour entry at new's MAC",
               interval=0.01)
    Script(new, ["serve", VIP, str(PORT), "--name", "new"]).next("listening")
    assert step(new, "list", VIP, str(PORT))[0]["connections"] == []   # new has no socket for it

    # The tickle from new: the client's blocked read fails at once.
    tickling, tickled = step(new, "reset", stdin=json.dumps(published))
    assert tickled["sent"] == 1
    lost = client.next("lost", timeout=5)
    assert lost["error"] == "ECONNRESET"
    assert tickling["t"] <= lost["t"] < tickled["t"] + 2.0, (tickling, tickled, lost)

    client.send("again")
    again = client.next("reconnected")
    assert again["reply"] == "pong from new"
    (listed,) = step(new, "list", VIP, str(PORT))
    assert listed["connections"] == [{"server": f"{VIP}:{PORT}", "client": f"{client_ip}:{again['local'][1]}"}]


def test_loopback_address_is_added_and_removed_the_same_way(lab: LabNetwork) -> None:
    host = lab.host(0)
    lo_vip = "127.0.0.77"
    took = step(host, "take", "lo", lo_vip) + step(host, "take", "lo", lo_vip)
    assert [(e["added"], e["announced"], e["present"]) for e in took] == [(True, False, True), (False, False, True)]
    released = step(host, "release", "lo", lo_vip) + step(host, "release", "lo", lo_vip)
    assert [(e["removed"], e["present"]) for e in released] == [(True, False), (False, False)]
