"""`opie lab up`: a whole cluster on one machine, as child processes on
loopback. For now the lab starts the ISUs; later issues add the head, the
array, volumes and shares to the same runner.

Layout of a lab directory:
    DIR/lab.json          what runs and how to reach it (rewritten on changes)
    DIR/ca/               the lab's cluster CA (created once, kept)
    DIR/tls/              admin/head certificates: nbdinfo/nbdcopy accept it as
                          ?tls-certificates=DIR/tls on nbds:// URIs
    DIR/isuN/             ISU N: state (identity), tls/, disk0.img, isu.log (its log),
                          isu.out (its JSON events)

Contract: `up` refuses to start over a lab whose processes are still alive;
disks and identities in DIR are reused, so data survives a restart. Every
child runs in its own session (Ctrl-C reaches only the runner, which stops
the children by pid); `down` stops the processes listed in lab.json.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from opie.fileio import atomic_write
from opie.head.apiclient import APIError
from opie.nbd import tls
from opie.shares.process import pid_alive

log = logging.getLogger(__name__)

LAB_JSON = "lab.json"
READY_TIMEOUT = 30.0
LAB_USER = "opielab"
HEAD_READY_TIMEOUT = 180.0


def _lab_port(home: Path, name: str = "port") -> int:
    """A port a lab process always uses (picked free once, kept in home/NAME),
    so member URIs and API addresses stay the same across restarts."""
    f = home / name
    if f.exists():
        return int(f.read_text())
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    f.write_text(f"{port}\n")
    return port


class LabError(Exception):
    """The lab cannot start or stop as asked; nothing was changed."""


_alive = pid_alive  # a zombie counts as dead


def read_lab(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / LAB_JSON
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise LabError(f"{path}: not valid JSON ({exc}); remove it to start afresh") from None


def lab_pids(lab: dict[str, Any]) -> list[int]:
    pids = [i["pid"] for i in lab.get("isus", [])] + [h["pid"] for h in lab.get("heads", [])]
    return [p for p in pids if isinstance(p, int)]


def _write_lab(directory: Path, lab: dict[str, Any]) -> None:
    atomic_write(directory / LAB_JSON, json.dumps(lab, indent=2) + "\n")


def _wait_ready(proc: subprocess.Popen, out_path: Path, log_path: Path, timeout: float) -> dict[str, Any]:
    """Wait (bounded) for the child's JSON ready line in its stdout file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                msg = json.loads(line)
                if msg.get("event") == "ready":
                    return msg
        if proc.poll() is not None:
            raise LabError(f"process exited with {proc.returncode}; see {log_path}:\n"
                           + log_path.read_text()[-1500:])
        time.sleep(0.05)
    raise LabError(f"not ready after {timeout}s; see {log_path}")


class Lab:
    """Starts and supervises the processes of one lab directory."""

    def __init__(self, directory: str | os.PathLike, isus: int = 5, disk_size: str = "2G",
                 with_head: bool = True):
        if isus < 1:
            raise LabError("a lab needs at least one ISU")
        if with_head and isus < 3:
            raise LabError("a lab with a head needs at least 3 ISUs (RAID5 over 2 would mirror)")
        self.with_head = with_head
        self.dir = Path(directory).resolve()
        self.n_isus = isus
        self.disk_size = disk_size
        self.procs: dict[str, subprocess.Popen] = {}  # in start order: ISUs, then the head
        self.lab: dict[str, Any] = {}

    def _certificates(self) -> Path:
        ca = self.dir / "ca"
        if not (ca / tls.CA_CERT).exists():
            tls.create_ca(ca, name=f"Opie lab CA ({self.dir.name})")
        admin = self.dir / "tls"
        tls.issue(ca, admin, client_name="opie-lab-admin", role="admin")
        return ca

    def _start_isu(self, index: int, ca: Path) -> dict[str, Any]:
        home = self.dir / f"isu{index}"
        home.mkdir(parents=True, exist_ok=True)
        tls_dir = home / "tls"
        tls.issue(ca, tls_dir, client_name=f"opie-lab-isu{index}", role="isu")
        disk = home / "disk0.img"
        spec = str(disk) if disk.exists() else f"{disk}:{self.disk_size}"
        port = _lab_port(home)
        log_path, out_path = home / "isu.log", home / "isu.out"
        with open(log_path, "ab") as logf, open(out_path, "wb") as outf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "opie.cli.main", "-v", "isu", "serve", "--disk", spec,
                 "--listen", f"127.0.0.1:{port}", "--state-dir", str(home), "--tls-dir", str(tls_dir)],
                stdout=outf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[f"isu{index}"] = proc
        ready = _wait_ready(proc, out_path, log_path, READY_TIMEOUT)
        return {"name": f"isu{index}", "uuid": ready["uuid"], "pid": proc.pid, "listen": ready["listen"],
                "exports": ready["exports"], "log": str(log_path)}

    def _start_head(self, ca: Path) -> dict[str, Any]:
        from opie.head import config as head_config  # noqa: PLC0415
        from opie.isu.disks import parse_size  # noqa: PLC0415
        home = self.dir / "head"
        home.mkdir(parents=True, exist_ok=True)
        tls_dir = home / "tls"
        tls.issue(ca, tls_dir, client_name="opie-lab-head0", role="head")
        members = [e for isu in self.lab["isus"] for e in isu["exports"]]
        fresh = not (home / head_config.FILENAME).exists()
        if fresh:
            disk = parse_size(self.disk_size)
            vol_size = (int((len(members) - 1) * disk * 0.6) // (1 << 20)) << 20
            cfg = head_config.HeadConfig(members=members, tls_dir=str(tls_dir), mount_root=str(self.dir / "mnt"),
                                         create_array=True, assume_clean=True,
                                         api_listen=f"127.0.0.1:{_lab_port(home, 'api-port')}",
                                         shares={"enabled": True, "bind_address": "127.0.0.1",
                                                 "smb_port": _lab_port(home, "smb-port"),
                                                 "nfs_port": _lab_port(home, "nfs-port")},
                                         nbd_listen=f"127.0.0.1:{_lab_port(home, 'nbd-port')}",
                                         volumes=[head_config.VolumeSpec("vol0", vol_size)])
        else:  # ISU ports change between runs; members are found by their superblocks
            cfg = head_config.load(home)
            cfg.members = members
        head_config.save(home, cfg)
        log_path, out_path = home / "head.log", home / "head.out"
        with open(log_path, "ab") as logf, open(out_path, "wb") as outf:
            proc = subprocess.Popen([sys.executable, "-m", "opie.cli.main", "-v", "head", "run", "--state-dir", str(home)],
                                    stdout=outf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs["head0"] = proc
        ready = _wait_ready(proc, out_path, log_path, HEAD_READY_TIMEOUT)
        self.lab["volumes"] = [{"name": v["name"], "mountpoint": v["mountpoint"], "export": v["export"]}
                               for v in ready["volumes"]]
        return {"name": ready["name"], "role": "active", "pid": proc.pid, "api": ready["api"],
                "token_file": ready["token_file"], "array": ready["array"], "log": str(log_path)}

    def _check_traversable(self) -> None:
        """Share users reach the volume as themselves (smbd switches to their
        uid), so every directory above the mount root must let others pass."""
        for parent in [self.dir, *self.dir.parents]:
            if not os.stat(parent).st_mode & 0o001:
                raise LabError(f"{parent} is not traversable by other users (mode "
                               f"{oct(os.stat(parent).st_mode & 0o777)}); share users could not reach "
                               f"the volume. Use a --dir under a world-traversable path such as /var/tmp")

    def _lab_shares(self) -> list[dict[str, Any]]:
        """The lab's user and its share of vol0 (SMB and NFS, previous versions
        on), created once; returns lab.json's `shares` entries."""
        from opie.head.apiclient import HeadAPI  # noqa: PLC0415
        from opie.head.fileservice import FileServiceConfig, lab_clients  # noqa: PLC0415
        from opie.head import config as head_config  # noqa: PLC0415
        from opie.shares.model import ShareTable  # noqa: PLC0415
        state = self.dir / "head" / "shares"
        pw_file = state / "lab-password"
        if not pw_file.exists():
            state.mkdir(parents=True, exist_ok=True)
            fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(12) + "\n")
        password = pw_file.read_text().strip()
        listed = subprocess.run([sys.executable, "-m", "opie.cli.main", "user", "list", "--json", "--state-dir", str(state)],
                                capture_output=True, text=True, timeout=60)
        if listed.returncode != 0 or LAB_USER not in listed.stdout:
            res = subprocess.run([sys.executable, "-m", "opie.cli.main", "user", "add", LAB_USER, "--password-stdin",
                                  "--state-dir", str(state)], input=password + "\n", capture_output=True,
                                 text=True, timeout=60)
            if res.returncode != 0:
                raise LabError(f"cannot create the lab user {LAB_USER}: {res.stderr.strip()}")
        h = self.lab["heads"][0]
        api = HeadAPI.locate(h["api"], h["token_file"])
        if not any(s["name"] == "vol0" for s in api.call("GET", "/v1/shares")):
            api.call("POST", "/v1/shares", {"name": "vol0", "volume": "vol0", "protocol": "both",
                                            "users": [LAB_USER], "networks": ["127.0.0.0/8"],
                                            "previous_versions": True,
                                            "comment": "the lab volume"})
        cfg = FileServiceConfig.from_dict(head_config.load(self.dir / "head").shares)
        table = ShareTable.from_dict({"volumes": {}, "shares": api.call("GET", "/v1/shares")})
        return lab_clients(table, "127.0.0.1", cfg, LAB_USER, password)

    def up(self) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        old = read_lab(self.dir)
        if old:
            alive = [p for p in lab_pids(old) if _alive(p)]
            if alive:
                raise LabError(f"a lab is already running in {self.dir} (pids {', '.join(map(str, alive))}); "
                               f"stop it with: opie lab down --dir {self.dir}")
        if self.with_head:
            self._check_traversable()
        ca = self._certificates()
        self.lab = {"dir": str(self.dir), "isus": [], "heads": [], "volumes": [], "shares": [],
                    "tls_certificates": str(self.dir / "tls"), "started": int(time.time())}
        try:
            for i in range(self.n_isus):
                self.lab["isus"].append(self._start_isu(i, ca))
                _write_lab(self.dir, self.lab)
            if self.with_head:
                self.lab["heads"].append(self._start_head(ca))
                try:
                    self.lab["shares"] = self._lab_shares()
                except APIError as exc:
                    raise LabError(f"cannot set up the lab's shares: {exc}") from None
                _write_lab(self.dir, self.lab)
        except BaseException:
            self.down()
            raise
        return self.lab

    def down(self) -> None:
        """Stop our children by pid, the head first (it unmounts and closes the
        array cleanly while the ISUs still serve), then the ISUs; SIGTERM, and
        SIGKILL after a grace period."""
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    log.error("pid %d did not stop in 60 s; killing it", p.pid)
                    p.kill()
                    p.wait(5)
        if self.lab:
            self.lab["stopped"] = int(time.time())
            _write_lab(self.dir, self.lab)

    def remove_user(self) -> None:
        """Delete the lab's share user from Samba's passdb, and its Unix account
        if the lab created it (for tests and benchmarks that leave no trace)."""
        subprocess.run([sys.executable, "-m", "opie.cli.main", "user", "del", LAB_USER, "--state-dir",
                        str(self.dir / "head" / "shares")], capture_output=True, timeout=60)

    # ------------------------------------------------------------ failures, for tests and demos
    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one lab process ('isu2', 'head0') and reap it."""
        p = self.procs[name]
        p.send_signal(sig)
        p.wait(30)

    def restart_isu(self, index: int) -> dict[str, Any]:
        """Start ISU `index` again (same disk, identity and port)."""
        info = self._start_isu(index, self.dir / "ca")
        self.lab["isus"][index] = info
        _write_lab(self.dir, self.lab)
        return info

    def restart_head(self) -> dict[str, Any]:
        info = self._start_head(self.dir / "ca")
        self.lab["heads"] = [info]
        _write_lab(self.dir, self.lab)
        return info

    def wait(self) -> int:
        """Block until Ctrl-C / SIGTERM or until a child dies; then stop all."""
        stop = {"signal": None}

        def handler(signum, _frame):
            stop["signal"] = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while stop["signal"] is None:
                dead = [p for p in self.procs.values() if p.poll() is not None]
                if dead:
                    log.error("lab process %d exited with %s; stopping the lab", dead[0].pid, dead[0].returncode)
                    return 1
                time.sleep(0.2)
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.down()


def down(directory: str | os.PathLike, timeout: float = 15.0) -> list[int]:
    """Stop the lab recorded in DIR/lab.json (from another shell)."""
    d = Path(directory).resolve()
    lab = read_lab(d)
    if lab is None:
        raise LabError(f"no lab in {d} (no {LAB_JSON})")
    heads = [h["pid"] for h in lab.get("heads", []) if _alive(h["pid"])]
    isus = [i["pid"] for i in lab.get("isus", []) if _alive(i["pid"])]
    for group, grace in ((heads, 60.0), (isus, timeout)):  # the head first: it unmounts cleanly
        for p in group:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in group):
            time.sleep(0.1)
        for p in group:
            if _alive(p):
                log.error("pid %d did not stop in %.0f s; killing it", p, grace)
                os.kill(p, signal.SIGKILL)
    return heads + isus


def summary(lab: dict[str, Any]) -> str:
    t = lab["tls_certificates"]
    lines = [f"Opie lab in {lab['dir']}", ""]
    for isu in lab["isus"]:
        lines.append(f"  {isu['name']}  {isu['uuid']}  pid {isu['pid']}")
        for e in isu["exports"]:
            lines.append(f"      {e}")
    for h in lab.get("heads", []):
        lines.append(f"  head {h['name']} ({h['role']})  pid {h['pid']}  array [{h['array']}]  API {h['api']}")
    for v in lab.get("volumes", []):
        lines.append(f"  volume {v['name']}  mounted at {v['mountpoint']}")
        lines.append(f"      {v['export']}")
    if lab.get("shares"):
        from opie.shares.clients import how_to_connect  # noqa: PLC0415
        lines.append("")
        for sh in lab["shares"]:
            lines.append(f"  share {sh['name']} ({sh['protocol']})  {sh['url']}"
                         + (f"  user {sh['user']} password {sh['password']}" if sh.get("user") else ""))
            lines.append(f"      {how_to_connect(sh)}")
    first = lab["isus"][0]["exports"][0] if lab["isus"] else None
    lines += ["", f"TLS certificates for clients: {t}"]
    if first:
        lines.append(f"  try:  nbdinfo '{first}?tls-certificates={t}'")
    lines += [f"lab.json: {lab['dir']}/{LAB_JSON}",
              f"Status: opie status --lab {lab['dir']}",
              f"Stop with Ctrl-C, or from another shell: opie lab down --dir {lab['dir']}"]
    return "\n".join(lines)
