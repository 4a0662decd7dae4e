"""Lab hosts in network namespaces: N hosts joined by one bridge.

Topology made by `LabNetwork` (every name starts with the lab prefix, e.g.
`opie-3f2a-`, so nothing else on the machine is touched)::

    netns PREFIXsw   bridge br0 (multicast snooping off, so mDNS floods)
       |-- p0 <veth> eth0 in netns PREFIXh0   (address ADDR0/P or none)
       |-- p1 <veth> eth0 in netns PREFIXh1
       ...

The bridge lives in its own "switch" namespace, so the root namespace gets no
new interface and the lab subnet is never routed anywhere. Each host has `lo`
and `eth0` up; hosts listed in `addressed` get `subnet.network + 1 + index`.

Processes run in a host with `LabHost.popen`: `nsenter --net` joins the
host's network namespace and execs the command, which keeps the root mount
namespace. (`ip netns exec` would give it a private copy of the mount table,
where a later umount leaves a live copy behind; see DESIGN.) The price:
/sys still shows the root namespace's network devices, so code in a lab
host asks netlink (pyroute2), never /sys/class/net. The lab stops
every process it started, by pid, and deletes its namespaces on exit, also
when the body raised; `remove_lab(prefix)` clears what a killed run left.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import NetNS, netns

log = logging.getLogger(__name__)

NETNS_DIR = "/var/run/netns"


def new_prefix(base: str = "opie") -> str:
    """A fresh lab prefix like `opie-3f2a-` (short: interface names are <= 15 chars)."""
    return f"{base}-{secrets.token_hex(2)}-"


@dataclass
class LabHost:
    """One host of the lab: a network namespace with `eth0` on the lab bridge."""

    index: int
    netns: str
    ifname: str = "eth0"
    address: ipaddress.IPv4Interface | None = None
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside this host's network namespace.

        `nsenter --net` joins the namespace and execs `argv` (same pid, root
        mount namespace). The lab owns the process: it is SIGTERMed (then
        SIGKILLed) by pid at teardown unless it has exited. Keyword
        arguments go to `Popen`.
        """
        proc = subprocess.Popen(["nsenter", f"--net={NETNS_DIR}/{self.netns}", "--", *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `argv` to completion in this host, capturing text output."""
        proc = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def ipr(self) -> NetNS:
        """A pyroute2 handle on this host's namespace; close it (or use `with`)."""
        return NetNS(self.netns)

    @property
    def mac(self) -> str:
        with self.ipr() as ipr:
            (link,) = ipr.link("get", ifname=self.ifname)
            return str(link.get_attr("IFLA_ADDRESS"))

    def addresses(self) -> list[ipaddress.IPv4Interface]:
        """The IPv4 addresses currently on `eth0`, as the kernel reports them."""
        with self.ipr() as ipr:
            (link,) = ipr.link("get", ifname=self.ifname)
            found = []
            for msg in ipr.addr("dump", family=socket.AF_INET, index=link["index"]):
                found.append(ipaddress.IPv4Interface(
                    f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"))
            return found

    def stop_processes(self, grace: float = 3.0) -> None:
        """SIGTERM every process this host started, SIGKILL what is left after `grace`."""
        live = [p for p in self._procs if p.poll() is None]
        for proc in live:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: pid %d ignored SIGTERM; killing it", self.netns, proc.pid)
                _signal(proc, signal.SIGKILL)
                proc.wait()
        self._procs.clear()


def _signal(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


class LabNetwork:
    """N lab hosts on one bridge; a context manager that always tears down.

    `with LabNetwork(hosts=4, subnet="10.213.7.0/24", addressed=[0]) as net:`
    gives `net.host(0)` the address 10.213.7.1/24 and leaves hosts 1..3
    without one (for the lease path). `addressed=None` addresses every host.
    At teardown each process gets `stop_grace` seconds between SIGTERM and SIGKILL.
    """

    def __init__(self, prefix: str | None = None, hosts: int = 2,
                 subnet: str = "10.213.0.0/24", addressed: Iterable[int] | None = None,
                 stop_grace: float = 3.0) -> None:
        self.stop_grace = stop_grace
        self.prefix = prefix or new_prefix()
        if len(self.prefix) > 11:
            raise ValueError(f"lab prefix {self.prefix!r} is longer than 11 characters")
        self.subnet = ipaddress.IPv4Network(subnet)
        self.switch = f"{self.prefix}sw"
        wanted = range(hosts) if addressed is None else set(addressed)
        self.hosts: list[LabHost] = [
            LabHost(i, f"{self.prefix}h{i}",
                    address=ipaddress.IPv4Interface(
                        f"{self.subnet.network_address + 1 + i}/{self.subnet.prefixlen}")
                    if i in wanted else None)
            for i in range(hosts)
        ]
        self._created: list[str] = []

    def host(self, index: int) -> LabHost:
        return self.hosts[index]

    def __enter__(self) -> LabNetwork:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Create the switch namespace, the bridge and every host."""
        for name in [self.switch] + [h.netns for h in self.hosts]:
            netns.create(name)
            self._created.append(name)
        with NetNS(self.switch) as sw:
            sw.link("add", ifname="br0", kind="bridge", br_mcast_snooping=0)
            (br,) = sw.link("get", ifname="br0")
            sw.link("set", index=br["index"], state="up")
            for host in self.hosts:
                port = f"p{host.index}"
                # Both ends are made here, then one end moves into the host
                # and takes its final name there.
                sw.link("add", ifname=port, kind="veth", peer=f"{self.prefix}x{host.index}")
                (peer,) = sw.link("get", ifname=f"{self.prefix}x{host.index}")
                sw.link("set", index=peer["index"], net_ns_fd=host.netns)
                (link,) = sw.link("get", ifname=port)
                sw.link("set", index=link["index"], master=br["index"], state="up")
        for host in self.hosts:
            with host.ipr() as ipr:
                (lo,) = ipr.link("get", ifname="lo")
                ipr.link("set", index=lo["index"], state="up")
                (eth,) = ipr.link("get", ifname=f"{self.prefix}x{host.index}")
                ipr.link("set", index=eth["index"], ifname=host.ifname)
                ipr.link("set", index=eth["index"], state="up")
                if host.address is not None:
                    ipr.addr("add", index=eth["index"], address=str(host.address.ip),
                             prefixlen=host.address.network.prefixlen)
        log.info("lab %s: %d hosts on %s", self.prefix, len(self.hosts), self.subnet)

    def down(self) -> None:
        """Stop the lab's processes and delete its namespaces; safe to call twice."""
        for host in self.hosts:
            try:
                host.stop_processes(self.stop_grace)
            except Exception:  # keep tearing down; the namespaces must go
                log.exception("lab %s: stopping processes of %s", self.prefix, host.netns)
        for name in reversed(self._created):
            try:
                netns.remove(name)
            except OSError as exc:
                log.warning("lab %s: removing netns %s: %s", self.prefix, name, exc)
        self._created.clear()


def lab_namespaces(prefix: str) -> list[str]:
    """Names of the network namespaces that belong to the lab `prefix`."""
    return sorted(n for n in netns.listnetns() if n.startswith(prefix))


def remove_lab(prefix: str) -> list[str]:
    """Delete every namespace named `prefix*` (what a killed run left); returns them.

    Refuses a prefix shorter than 5 characters so a typo cannot wipe
    unrelated namespaces.
    """
    if len(prefix) < 5:
        raise ValueError(f"refusing to remove namespaces by the short prefix {prefix!r}")
    gone = lab_namespaces(prefix)
    for name in gone:
        netns.remove(name)
    return gone
