"""A real 3-member etcd cluster with TLS for tests, and clients of it.

`etcd_cluster` starts one cluster per test module (module scope keeps the
tests fast); every member is stopped by its pid at teardown, also on failure.
A test that kills or pauses members must give them back (restart/resume and
wait until healthy) before it ends, so the next test finds three members.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from opie.discovery.coord import Coord
from opie.discovery.etcd_member import EtcdCluster, EtcdMember, MemberSpec, issue_member_tls
from opie.nbd import tls
from tests.proc_support import free_port, freeze

CLUSTER = "test"


@dataclass
class EtcdLab:
    cluster: EtcdCluster
    ca_dir: Path
    head_tls: Path          # a head's client certificate from the cluster CA
    root: Path
    started_in: float       # seconds from the first start to all members healthy

    def coord(self, *, endpoints: list[str] | None = None, tls_dir: Path | None = None,
              timeout: float = 0.5) -> Coord:
        return Coord(endpoints or self.cluster.endpoints, CLUSTER, tls_dir or self.head_tls, timeout=timeout)

    def pause(self, member: EtcdMember) -> None:
        assert member.pid is not None
        freeze(member.pid)

    def resume(self, member: EtcdMember) -> None:
        assert member.pid is not None
        os.kill(member.pid, signal.SIGCONT)

    def heal(self, timeout: float = 15.0) -> None:
        """Every member running, not paused, and healthy again."""
        for m in self.cluster.members:
            if m.running():
                self.resume(m)
            else:
                m.start()
        self.cluster.wait_healthy(timeout, self.cluster.members)


def start_etcd_lab(root: Path) -> EtcdLab:
    ca = tls.create_ca(root / "ca")
    specs = [MemberSpec(f"etcd{i}", "127.0.0.1", free_port(), free_port()) for i in range(3)]
    tls_dirs = {s.name: issue_member_tls(ca, root / f"tls-{s.name}", s) for s in specs}
    head_tls = tls.issue(ca, root / "tls-head", client_name="head-test", role="head")
    cluster = EtcdCluster(specs, root / "state", tls_dirs)
    began = time.monotonic()
    cluster.start()
    return EtcdLab(cluster, ca, head_tls, root, time.monotonic() - began)


@pytest.fixture(scope="module")
def etcd_lab(tmp_path_factory):
    lab = start_etcd_lab(tmp_path_factory.mktemp("etcd"))
    try:
        yield lab
    finally:
        lab.cluster.stop()
