"""The network-namespace lab: hosts on one bridge, processes inside, teardown that always works."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time

import pytest

from opie.lab.netns import LabNetwork, lab_namespaces, new_prefix, remove_lab


def test_hosts_reach_each_other_and_teardown_removes_everything() -> None:
    with LabNetwork(hosts=3, subnet="10.213.61.0/24", addressed=[0, 1]) as net:
        assert lab_namespaces(net.prefix) == sorted(
            [f"{net.prefix}sw"] + [f"{net.prefix}h{i}" for i in range(3)])
        assert net.host(0).addresses() == [ipaddress.IPv4Interface("10.213.61.1/24")]
        assert net.host(1).addresses() == [ipaddress.IPv4Interface("10.213.61.2/24")]
        assert net.host(2).addresses() == []          # left for the lease path
        reply = net.host(1).run(["arping", "-c", "1", "-w", "2", "-I", "eth0", "10.213.61.1"])
        assert reply.returncode == 0, reply.stdout + reply.stderr
        assert net.host(0).mac.lower() in reply.stdout.lower()
        # The root namespace does not see the lab subnet.
        assert "10.213.61." not in subprocess.run(["ip", "-4", "addr"], capture_output=True,
                                                   text=True).stdout
        sleeper = net.host(2).popen(["sleep", "300"])
        deadline = time.monotonic() + 5
        while open(f"/proc/{sleeper.pid}/comm").read().strip() != "sleep":  # nsenter has exec'd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # popen keeps the root mount namespace (unlike `ip netns exec`).
        assert os.readlink(f"/proc/{sleeper.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
        assert os.readlink(f"/proc/{sleeper.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert sleeper.poll() is not None
    assert lab_namespaces(net.prefix) == []


def test_teardown_happens_when_the_body_fails() -> None:
    net = LabNetwork(hosts=2, subnet="10.213.62.0/24", stop_grace=0.5)
    with pytest.raises(RuntimeError, match="boom"):
        with net:
            stubborn = net.host(0).popen(
                [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                 " print('ready', flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
            assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
            raise RuntimeError("boom")
    assert stubborn.returncode == -signal.SIGKILL   # it ignored SIGTERM
    assert lab_namespaces(net.prefix) == []


def test_remove_lab_clears_leftovers_and_refuses_short_prefixes() -> None:
    net = LabNetwork(prefix=new_prefix(), hosts=1)
    net.up()   # as if the run had been killed before teardown
    assert remove_lab(net.prefix) == sorted([f"{net.prefix}h0", f"{net.prefix}sw"])
    assert lab_namespaces(net.prefix) == []
    with pytest.raises(ValueError):
        remove_lab("op")
    with pytest.raises(ValueError):
        LabNetwork(prefix="much-too-long-prefix-")
