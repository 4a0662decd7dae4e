"""`opie lab up --netns`: a head and N ISUs as hosts in network namespaces.

Topology (lab.netns.LabNetwork, every name carries the lab prefix)::

    h0        the head: SUBNET.1, lease server (pool SUBNET.100..), ISU registry, API on :8080
    h1..hN    ISUs without an address: each leases one from the head's pool,
              announces itself, and serves one sparse disk over NBD (TLS) on :10809
    h(N+1)..  `extra_hosts` without anything running (for tests and demos)

The head config has no member list: `discover: true`, `discover_members: N`,
`create_array: true`. The head starts its API, then waits until N ISUs are
adopted (by `up(adopt=True)`, or by the admin: `opie isu adopt UUID --as member`),
creates the array and reports ready; after a restart it finds the members by
discovery alone. TLS everywhere between head and ISUs: a lab CA, each ISU's
server certificate carries every pool address (the lease decides which one
it gets), the head's carries its own.

Layout of DIR: ca/, cluster-token, head/ (head.json, tls/, head.log, head.out),
isuK/ (isu.json, tls/, disk0.img, isu.log, isu.out), lab.json. The lab
lives as long as the process that made it: `down()` (or leaving the `with`)
stops every process and deletes the namespaces, also after a failure.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from opie.lab.netns import LabHost, LabNetwork
from opie.lab.runner import LAB_JSON, Lab, LabError, _wait_ready, _write_lab
from opie.nbd import tls

log = logging.getLogger(__name__)

DEFAULT_SUBNET = "10.213.90.0/24"
POOL_FIRST = 100
API_PORT = 8080
HEAD_NBD_PORT = 10810
ISU_NBD_PORT = 10809
ISU_READY_TIMEOUT = 60.0
API_TIMEOUT = 30.0


class NetnsLab:
    """A head and `isus` ISU hosts on one lab bridge; use as a context manager."""

    def __init__(self, directory: str | os.PathLike, isus: int = 4, disk_size: str = "256M",
                 subnet: str = DEFAULT_SUBNET, extra_hosts: int = 0, cluster_id: str | None = None,
                 prefix: str | None = None, discover_timeout: float = 300.0) -> None:
        if isus < 3:
            raise LabError("a lab with a head needs at least 3 ISUs (RAID5 over 2 would mirror)")
        self.dir = Path(directory).resolve()
        self.n_isus = isus
        self.disk_size = disk_size
        self.subnet = ipaddress.IPv4Network(subnet)
        self.discover_timeout = discover_timeout
        self.pool = [self.subnet.network_address + POOL_FIRST + i for i in range(isus + 10)]
        if self.pool[-1] not in self.subnet:
            raise LabError(f"subnet {subnet} too small for a pool of {len(self.pool)} addresses")
        self.net = LabNetwork(prefix=prefix, hosts=1 + isus + extra_hosts, subnet=subnet, addressed=[0])
        self.cluster_id = cluster_id or f"lab-{self.net.prefix.strip('-')}"
        self.head_host: LabHost = self.net.host(0)
        self.head_address = str(self.head_host.address.ip) if self.head_host.address else ""
        self.api_url = f"http://{self.head_address}:{API_PORT}"
        self.head_proc: subprocess.Popen[Any] | None = None
        self.isu_procs: dict[int, subprocess.Popen[Any]] = {}
        self.lab: dict[str, Any] = {}

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, adopt: bool = True) -> dict[str, Any]:
        """Namespaces, certificates, the head, the ISUs (leased, announced); with `adopt`,
        every ISU adopted as a member and the head's array ready. Tears down on failure."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.net.up()
            self._certificates()
            self.lab = {"dir": str(self.dir), "netns": self.net.prefix, "cluster_id": self.cluster_id,
                        "isus": [], "heads": [], "volumes": [], "shares": [],
                        "tls_certificates": str(self.dir / "tls"), "started": int(time.time())}
            self.start_head()
            self.wait_api()
            spawned = [self.spawn_isu(i) for i in range(1, self.n_isus + 1)]  # they lease in parallel
            for i in spawned:
                self.lab["isus"].append(self.wait_isu(i))
                _write_lab(self.dir, self.lab)
            if adopt:
                for isu in self.lab["isus"]:
                    self.api("POST", f"/v1/isus/{isu['uuid']}/adopt", {"role": "member"})
                self.wait_head_ready()
        except BaseException:
            self.down()
            raise
        return self.lab

    def down(self) -> None:
        """Head first (it closes the array while the ISUs still serve), then everything else."""
        if self.head_proc is not None and self.head_proc.poll() is None:
            self.stop_head()
        self.net.down()
        if self.lab:
            self.lab["stopped"] = int(time.time())
            _write_lab(self.dir, self.lab)

    @property
    def procs(self) -> dict[str, subprocess.Popen[Any]]:
        """The lab's processes by name (what `wait` watches)."""
        head = {"head0": self.head_proc} if self.head_proc is not None else {}
        return {**head, **{f"isu{i}": p for i, p in self.isu_procs.items()}}

    # Block until Ctrl-C / SIGTERM or until a lab process dies; then tear down (as the loopback lab).
    wait = Lab.wait

    # ------------------------------------------------------------ pieces
    def _certificates(self) -> None:
        ca = self.dir / "ca"
        if not (ca / tls.CA_CERT).exists():
            tls.create_ca(ca, name=f"Opie netns lab CA ({self.dir.name})")
        tls.issue(ca, self.dir / "tls", client_name="opie-lab-admin", role="admin")
        token = self.dir / "cluster-token"
        if not token.exists():
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")

    def start_head(self) -> None:
        """Start (or restart) the head in h0; the config is written once and then kept."""
        from opie.head import config as head_config  # noqa: PLC0415
        home = self.dir / "head"
        home.mkdir(parents=True, exist_ok=True)
        tls.issue(self.dir / "ca", home / "tls", server_names=[self.head_address],
                  client_name="opie-lab-head0", role="head")
        if not (home / head_config.FILENAME).exists():
            cfg = head_config.HeadConfig(
                members=[], tls_dir=str(home / "tls"), mount_root=str(self.dir / "mnt"),
                create_array=True, assume_clean=True,
                api_listen=f"{self.head_address}:{API_PORT}",
                nbd_listen=f"{self.head_address}:{HEAD_NBD_PORT}",
                discover=True, cluster_id=self.cluster_id, discover_members=self.n_isus,
                discover_timeout=self.discover_timeout,
                lease_pool=f"{self.pool[0]}-{self.pool[-1]}", lease_interface="eth0",
                lease_prefixlen=self.subnet.prefixlen, lease_token_file=str(self.dir / "cluster-token"),
                insecure=True)   # the API is plain HTTP on the lab bridge (NBD and control use TLS)
            head_config.save(home, cfg)
        log_path, out_path = home / "head.log", home / "head.out"
        with open(log_path, "ab") as logf, open(out_path, "wb") as outf:
            self.head_proc = self.head_host.popen(
                [sys.executable, "-m", "opie.cli.main", "-v", "head", "run", "--state-dir", str(home)],
                stdout=outf, stderr=logf, stdin=subprocess.DEVNULL)
        self.lab["heads"] = [{"name": "head0", "role": "active", "pid": self.head_proc.pid,
                              "netns": self.head_host.netns, "api": self.api_url,
                              "token_file": str(home / "api-token"), "array": None, "log": str(log_path)}]
        _write_lab(self.dir, self.lab)

    def stop_head(self, timeout: float = 60.0) -> None:
        assert self.head_proc is not None
        self.head_proc.terminate()
        try:
            self.head_proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("head pid %d did not stop in %.0f s; killing it", self.head_proc.pid, timeout)
            self.head_proc.kill()
            self.head_proc.wait(5)

    def wait_head_ready(self, timeout: float = 180.0) -> dict[str, Any]:
        """The head's ready line (array assembled or created); its array string goes to lab.json."""
        assert self.head_proc is not None
        home = self.dir / "head"
        ready = _wait_ready(self.head_proc, home / "head.out", home / "head.log", timeout)
        self.lab["heads"][0]["array"] = ready["array"]
        _write_lab(self.dir, self.lab)
        return ready

    def start_isu(self, index: int, extra: list[str] | None = None) -> dict[str, Any]:
        """Start (or restart) ISU `index` (host h`index`); returns its ready line and pid."""
        return self.wait_isu(self.spawn_isu(index, extra))

    def spawn_isu(self, index: int, extra: list[str] | None = None) -> int:
        """Start ISU `index` without waiting; `extra` replaces the lease arguments."""
        host = self.net.host(index)
        home = self.dir / f"isu{index}"
        home.mkdir(parents=True, exist_ok=True)
        tls.issue(self.dir / "ca", home / "tls", server_names=[str(a) for a in self.pool],
                  client_name=f"opie-lab-isu{index}", role="isu")
        disk = home / "disk0.img"
        spec = str(disk) if disk.exists() else f"{disk}:{self.disk_size}"
        log_path, out_path = home / "isu.log", home / "isu.out"
        argv = [sys.executable, "-m", "opie.cli.main", "-v", "isu", "serve", "--disk", spec,
                "--listen", f"0.0.0.0:{ISU_NBD_PORT}", "--state-dir", str(home), "--tls-dir", str(home / "tls"),
                *(extra if extra is not None else
                  ["--lease", "eth0", "--cluster-token-file", str(self.dir / "cluster-token")])]
        with open(log_path, "ab") as logf, open(out_path, "wb") as outf:
            proc = host.popen(argv, stdout=outf, stderr=logf, stdin=subprocess.DEVNULL)
        self.isu_procs[index] = proc
        return index

    def wait_isu(self, index: int) -> dict[str, Any]:
        """ISU `index`'s ready line (it has its address and is announced), as lab.json lists it."""
        home, proc, host = self.dir / f"isu{index}", self.isu_procs[index], self.net.host(index)
        ready = _wait_ready(proc, home / "isu.out", home / "isu.log", ISU_READY_TIMEOUT)
        return {"name": f"isu{index}", "uuid": ready["uuid"], "pid": proc.pid, "netns": host.netns,
                "address": ready.get("address"), "listen": ready["listen"], "log": str(home / "isu.log"),
                "exports": [f"nbds://{ready.get('address')}:{ISU_NBD_PORT}/{d['name']}" for d in ready["disks"]]}

    # ------------------------------------------------------------ the head's API from inside h0
    def api(self, method: str, path: str, body: dict[str, Any] | None = None,
            timeout: float = 120.0) -> Any:
        """Call the head's API with curl run in the head's namespace; raises LabError on HTTP >= 400."""
        token = (self.dir / "head" / "api-token").read_text().strip()
        argv = ["curl", "-sS", "-X", method, "-H", f"Authorization: Bearer {token}",
                "-w", "\n%{http_code}", "--max-time", str(int(timeout))]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
        res = self.head_host.run(argv + [self.api_url + path], timeout=timeout + 5)
        text, _, code = res.stdout.rpartition("\n")
        if res.returncode != 0 or not code.isdigit() or int(code) >= 400:
            raise LabError(f"{method} {path}: {code or res.returncode} {text.strip() or res.stderr.strip()}")
        return json.loads(text or "null")

    def wait_api(self, timeout: float = API_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        token = self.dir / "head" / "api-token"
        while time.monotonic() < deadline:
            if self.head_proc is not None and self.head_proc.poll() is not None:
                raise LabError(f"head exited with {self.head_proc.returncode}; see {self.dir}/head/head.log:\n"
                               + (self.dir / "head" / "head.log").read_text()[-1500:])
            if token.exists():
                try:
                    self.api("GET", "/v1/isus", timeout=2)
                    return
                except (LabError, subprocess.TimeoutExpired):
                    pass
            time.sleep(0.2)
        raise LabError(f"head API {self.api_url} not up after {timeout:.0f} s")


def summary(lab: dict[str, Any]) -> str:
    head = lab["heads"][0]
    enter = f"nsenter --net=/var/run/netns/{head['netns']} --"
    lines = [f"Opie netns lab in {lab['dir']} (namespaces {lab['netns']}*, cluster {lab['cluster_id']})", ""]
    lines.append(f"  head0  pid {head['pid']}  array [{head['array'] or 'waiting for members'}]  API {head['api']}")
    for isu in lab["isus"]:
        lines.append(f"  {isu['name']}  {isu['uuid']}  {isu['address']}  pid {isu['pid']}  "
                     f"netns {isu['netns']}")
    lines += ["", "The API is reachable from the head's namespace:",
              f"  {enter} opie isu list --lab {lab['dir']}",
              f"  {enter} opie status --lab {lab['dir']}",
              f"lab.json: {lab['dir']}/{LAB_JSON}", "Stop with Ctrl-C (namespaces are removed)."]
    return "\n".join(lines)
