"""Run etcd members for an Opie cluster: certificates, command line, process.

A member runs beside an ISU agent on its host (3 members; 5 from 7 ISUs on).
Client and peer traffic are TLS with client-certificate authentication from
the cluster CA: a peer or client without a certificate the CA signed fails the
handshake. etcd presents its server certificate also as a client certificate
(on peer links, and to its own gRPC gateway), so member certificates carry
both usages and IP SANs for the member's address.

Timing for a LAN (RTT well under 1 ms): heartbeat 50 ms, election timeout
300 ms (etcd wants election >= 5 heartbeats; a heartbeat of a few RTTs).
Followers notice a lost leader after 300-600 ms (raft randomises it) and elect
a new one in one round trip, so a keepalive waiting at a follower completes
well inside the head's lease (2 s) minus its demotion margin (0.6 s): losing
the etcd leader does not demote the active head. (With 500 ms it sometimes
did.) The smallest lease etcd grants is then 1 s (1.5 election timeouts,
rounded up). A loaded or virtualised host may need larger values: pass them.

The data directory is `STATE/etcd-NAME`, the log `STATE/etcd-NAME.log`.
`EtcdMember` starts and stops one process by its pid; `EtcdCluster` starts
several and waits (bounded) until every one reports itself healthy. Labs and
tests use them; a member started again on its data directory rejoins.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from opie.discovery.coord import Coord
from opie.discovery.errors import EtcdMemberError
from opie.nbd import tls

log = logging.getLogger(__name__)

ETCD = "etcd"
HEARTBEAT_MS = 50
ELECTION_MS = 300
CLIENT_PORT, PEER_PORT = 2379, 2380


@dataclass(frozen=True)
class MemberSpec:
    """Where one member listens. `host` is an IP address (the certificate's SAN)."""
    name: str
    host: str
    client_port: int = CLIENT_PORT
    peer_port: int = PEER_PORT

    @property
    def client_url(self) -> str:
        return f"https://{self._host()}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self._host()}:{self.peer_port}"

    def _host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def issue_member_tls(ca_dir: str | os.PathLike, tls_dir: str | os.PathLike, spec: MemberSpec) -> Path:
    """Certificates for member `spec` in `tls_dir`, signed by the CA in
    `ca_dir`: a server certificate that also authenticates as a client, for
    the member's address (and loopback, which etcd's gateway dials)."""
    names = list(dict.fromkeys([spec.host, "127.0.0.1", "localhost"]))
    return tls.issue(ca_dir, tls_dir, server_names=names, client_name=f"etcd-{spec.name}",
                     role="isu", server_as_client=True)


def member_command(spec: MemberSpec, cluster: list[MemberSpec], *, data_dir: Path, tls_dir: Path,
                   token: str, heartbeat_ms: int = HEARTBEAT_MS, election_ms: int = ELECTION_MS) -> list[str]:
    """The etcd command line for `spec` in `cluster` (a pure function)."""
    d = Path(tls_dir)
    cert, key, ca = str(d / tls.SERVER_CERT), str(d / tls.SERVER_KEY), str(d / tls.CA_CERT)
    return [
        ETCD, "--name", spec.name, "--data-dir", str(data_dir),
        "--listen-client-urls", spec.client_url, "--advertise-client-urls", spec.client_url,
        "--listen-peer-urls", spec.peer_url, "--initial-advertise-peer-urls", spec.peer_url,
        "--initial-cluster", ",".join(f"{m.name}={m.peer_url}" for m in cluster),
        "--initial-cluster-state", "new", "--initial-cluster-token", token,
        "--heartbeat-interval", str(heartbeat_ms), "--election-timeout", str(election_ms),
        "--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
        "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca,
        "--peer-client-cert-auth",
        "--logger", "zap", "--log-outputs", "stderr",
    ]


class EtcdMember:
    """One etcd process. start/stop/kill act on its pid only."""

    def __init__(self, spec: MemberSpec, cluster: list[MemberSpec], state_dir: str | os.PathLike,
                 tls_dir: str | os.PathLike, *, token: str = "opie", heartbeat_ms: int = HEARTBEAT_MS,
                 election_ms: int = ELECTION_MS) -> None:
        self.spec = spec
        self.state_dir = Path(state_dir)
        self.tls_dir = Path(tls_dir)
        self.data_dir = self.state_dir / f"etcd-{spec.name}"
        self.log_path = self.state_dir / f"etcd-{spec.name}.log"
        self.command = member_command(spec, cluster, data_dir=self.data_dir, tls_dir=self.tls_dir,
                                      token=token, heartbeat_ms=heartbeat_ms, election_ms=election_ms)
        self.proc: subprocess.Popen | None = None
        self.probe = Coord([spec.client_url], "health", self.tls_dir, timeout=0.5)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the process (again, on the same data directory, after a stop)."""
        if self.running():
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logfile:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=logfile,
                                         stderr=subprocess.STDOUT)
        log.info("etcd %s: started, pid %d, client %s", self.spec.name, self.proc.pid, self.spec.client_url)

    def healthy(self) -> bool:
        """True when the member has a leader and answers a linearizable read."""
        return self.running() and self.probe.healthy(0)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (and SIGCONT, should it be paused), wait, then SIGKILL."""
        if not self.running():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.send_signal(signal.SIGCONT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        log.info("etcd %s: stopped", self.spec.name)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data directory stays for a restart."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(5)
            log.info("etcd %s: killed", self.spec.name)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class EtcdCluster:
    """Members started together, for a lab or a test."""

    def __init__(self, specs: list[MemberSpec], state_dir: str | os.PathLike,
                 tls_dirs: dict[str, Path], **member_options) -> None:
        self.members = [EtcdMember(spec, specs, state_dir, tls_dirs[spec.name], **member_options)
                        for spec in specs]

    @property
    def endpoints(self) -> list[str]:
        return [m.spec.client_url for m in self.members]

    def member(self, name: str) -> EtcdMember:
        return next(m for m in self.members if m.spec.name == name)

    def start(self, timeout: float = 15.0) -> None:
        """Start every member that is not running and wait until all running
        members are healthy; on a timeout stop them all and raise EtcdMemberError."""
        for m in self.members:
            m.start()
        try:
            self.wait_healthy(timeout)
        except EtcdMemberError:
            self.stop()
            raise

    def wait_healthy(self, timeout: float = 15.0, members: list[EtcdMember] | None = None) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(members or [m for m in self.members if m.running()])
        while waiting:
            waiting = [m for m in waiting if not m.healthy()]
            for m in waiting:
                if not m.running():
                    raise EtcdMemberError(f"etcd {m.spec.name} exited:\n{m.log_tail()}")
            if waiting and time.monotonic() > deadline:
                names = ", ".join(m.spec.name for m in waiting)
                raise EtcdMemberError(f"etcd {names} not healthy after {timeout}s:\n{waiting[0].log_tail()}")
            if waiting:
                time.sleep(0.05)

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def leader(self) -> EtcdMember | None:
        """The member that is raft leader now (by its status), or None."""
        for m in self.members:
            if m.running() and m.probe.is_leader(0):
                return m
        return None
