"""Takeover of a killed active head by the passive one (issue 10), real processes on loopback.

Three real ISUs (role-isu certificates, control channel on 127.0.0.1), a
3-member etcd with TLS, and two real heads (`opie head run`) with the `ha`
section: one CA signs everything. What must hold:

- exactly one head becomes active; the other is passive and names it;
- a pattern written with FUA through the active's volume export (and
  flushed) reads back equal through the new active's export after the
  active was SIGKILLed; the new active has a larger epoch and a timeline
  of the takeover steps in order, and holds the service address;
- an ISU paused during the takeover misses the fence: the array assembles
  without its member; once it runs again it is fenced at the new epoch in
  the background and its member re-added (the array whole again);
- a member connection at the old epoch is refused by the ISUs;
- the killed head, restarted, comes up passive and names the new active;
- `opie ha status --json` answers on both heads;
- `opie ha switchover` hands the active role back (clean stop, resign): the
  other head serves the same bytes at a larger epoch.

Every process is stopped by its pid at teardown, and the service address
is removed, also when the test fails.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opie.head import config as head_config
from opie.head.apiclient import APIError, HeadAPI
from opie.head.ha.address import ServiceAddress
from opie.nbd import tls
from opie.nbd.client import NBDClient
from opie.nbd.errors import EpochRefused
from proc_support import free_port, freeze, read_ready, start_isu, stop
from tests.etcd_support import etcd_lab  # noqa: F401  (fixture)

MiB = 1 << 20
TAKEOVER_WITHIN = 30.0
STEPS = ["fence", "connect", "assemble", "pool", "exports", "mounts", "address", "connections"]


def run_head(state_dir: Path) -> subprocess.Popen:
    log = open(state_dir / "head.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "opie.cli.main", "-v", "head", "run",
                                 "--state-dir", str(state_dir)],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    finally:
        log.close()


def ready_line(proc: subprocess.Popen, state_dir: Path, timeout: float = 30.0) -> dict:
    ready = read_ready(proc, timeout)
    if ready is None:
        raise AssertionError(f"head not ready (exit {proc.poll()}): "
                             f"{(state_dir / 'head.log').read_text()[-3000:]}")
    return ready


def served(st: dict) -> bool:
    """The head is active and its takeover at its epoch finished."""
    return st["role"] == "active" and not st["taking_over"] and bool(st["timeline"]) \
        and st["timeline"]["epoch"] == st["epoch"]


def until(what, timeout: float, step: float = 0.1):
    """Poll `what()` until it returns something true; that value (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = what()
        except (APIError, OSError):
            got = None
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"not reached within {timeout}s")


class Heads:
    """Two heads' state dirs, processes and API clients; stopped by pid at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.api: dict[str, HeadAPI] = {}
        self.ready: dict[str, dict] = {}

    def start(self, name: str) -> None:
        d = self.root / name
        self.procs[name] = run_head(d)
        self.ready[name] = ready_line(self.procs[name], d)
        assert self.ready[name]["role"] == "passive"    # an HA head starts passive
        self.api[name] = HeadAPI(self.ready[name]["api"], Path(self.ready[name]["token_file"]).read_text().strip(),
                                 timeout=10)

    def ha(self, name: str) -> dict:
        return self.api[name].call("GET", "/v1/ha")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc, timeout=30)


async def write_pattern(uri_port: int, ctx, chunks: list[tuple[int, bytes]]) -> None:
    c = await NBDClient.connect("127.0.0.1", uri_port, "vol0", tls_context=ctx, timeout=20)
    try:
        for offset, data in chunks:
            await c.write(offset, data, fua=True)
        await c.flush()
    finally:
        await c.close()


async def read_back(port: int, ctx, chunks: list[tuple[int, bytes]]) -> list[bool]:
    c = await NBDClient.connect("127.0.0.1", port, "vol0", tls_context=ctx, timeout=20)
    try:
        return [bytes(await c.read(offset, len(data))) == data for offset, data in chunks]
    finally:
        await c.close()


@pytest.fixture
def vip():
    address = ServiceAddress.parse("lo", f"127.{random.randint(100, 199)}.{random.randint(1, 250)}.7")
    try:
        yield address
    finally:
        address.release()


def test_kill_the_active_the_passive_takes_over_with_every_acknowledged_byte(etcd_lab, tmp_path, vip):
    ca = etcd_lab.ca_dir
    isu_tls = tls.issue(ca, tmp_path / "tls-isu", client_name="isu", role="isu")
    head_tls = {n: tls.issue(ca, tmp_path / f"tls-{n}", client_name=n, role="head") for n in ("head-a", "head-b")}
    client_ctx = tls.client_context(head_tls["head-a"])
    isus, heads = [], Heads(tmp_path)
    try:
        for i in range(3):
            isus.append(start_isu(str(tmp_path / f"isu{i}"), [f"{tmp_path}/isu{i}/disk0.img:16M"],
                                  tls_dir=str(isu_tls), extra=["--announce", "127.0.0.1", "--control-port", "0"]))
        members = [f"nbds://127.0.0.1:{isu.port}/disk0" for isu in isus]
        control = {m: isu.ready["control"] for m, isu in zip(members, isus)}
        mirror = {n: f"127.0.0.1:{free_port()}" for n in head_tls}
        nbd_port = {n: free_port() for n in head_tls}
        for name, other in (("head-a", "head-b"), ("head-b", "head-a")):
            ha = head_config.HAConfig(etcd=etcd_lab.cluster.endpoints, cluster=f"takeover{os.getpid()}",
                                      service_address=str(vip.address), service_interface="lo",
                                      mirror_listen=mirror[name], mirror_peer=mirror[other], control=control)
            head_config.save(tmp_path / name, head_config.HeadConfig(
                members=members, tls_dir=str(head_tls[name]), mount_root=str(tmp_path / name / "mnt"),
                name=name, nbd_listen=f"127.0.0.1:{nbd_port[name]}", create_array=True, assume_clean=True,
                ha=ha))
        for name in head_tls:
            heads.start(name)

        # exactly one active; the other passive and naming it
        def one_active():
            roles = {n: heads.ha(n) for n in head_tls}
            active = [n for n, st in roles.items() if served(st)]
            return active[0] if len(active) == 1 else None
        first = until(one_active, 20)
        second = next(n for n in head_tls if n != first)
        until(lambda: heads.ha(second)["leader"] == first, 10)
        assert heads.ha(second)["role"] == "passive"
        old_epoch = heads.ha(first)["epoch"]
        assert vip.present()

        heads.api[first].call("POST", "/v1/volumes", {"name": "vol0", "size": 8 * MiB})
        rng = random.Random(7)
        chunks = [(0, rng.randbytes(MiB)), (3 * MiB + 4096, rng.randbytes(256 * 1024)),
                  (8 * MiB - 65536, rng.randbytes(65536))]
        asyncio.run(write_pattern(nbd_port[first], client_ctx, chunks))

        freeze(isus[2].proc.pid)      # isu2 cannot acknowledge the fence: its member stays out
        heads.procs[first].send_signal(signal.SIGKILL)
        heads.procs[first].wait(10)
        killed = time.monotonic()
        new = until(lambda: served(st := heads.ha(second)) and st,
                    TAKEOVER_WITHIN)
        print(f"takeover {time.monotonic() - killed:.2f} s after the kill; timeline {json.dumps(new['timeline'])}")
        assert new["epoch"] > old_epoch
        assert [s["step"] for s in new["timeline"]["steps"]] == STEPS
        assert new["timeline"]["steps"][0]["acknowledged"] == 2
        assert new["timeline"]["steps"][2]["array"] == "UU_"          # assembled degraded without it
        assert list(new["unfenced"]) == [isus[2].ready["control"]]
        assert new["timeline"]["epoch"] == new["epoch"]
        assert new["cluster_failover"]["epoch"] == new["epoch"]       # recorded in etcd
        assert vip.present()

        assert asyncio.run(read_back(nbd_port[second], client_ctx, chunks)) == [True] * len(chunks)

        # isu2 back: fenced at the new epoch in the background, then its member re-added
        os.kill(isus[2].proc.pid, signal.SIGCONT)
        until(lambda: not heads.ha(second)["unfenced"], 15)
        until(lambda: heads.api[second].status()["array"]["state"] == "UUU", 20)

        # the ISUs refuse a member connection at the old epoch
        async def old_epoch_refused() -> None:
            with pytest.raises(EpochRefused):
                await NBDClient.connect("127.0.0.1", isus[0].port, "disk0", tls_context=client_ctx,
                                        epoch=old_epoch, timeout=5)
        asyncio.run(old_epoch_refused())

        # the killed head comes back passive and names the new active
        heads.start(first)
        until(lambda: heads.ha(first)["leader"] == second, 15)
        assert heads.ha(first)["role"] == "passive"
        with pytest.raises(APIError) as refused:
            heads.api[first].call("GET", "/v1/status")
        assert refused.value.status == 503 and second in str(refused.value)

        for name, role in ((first, "passive"), (second, "active")):
            out = subprocess.run([sys.executable, "-m", "opie.cli.main", "ha", "status", "--json",
                                  "--head", heads.ready[name]["api"], "--token-file",
                                  heads.ready[name]["token_file"]],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            st = json.loads(out.stdout)
            assert (st["name"], st["role"], st["leader"]) == (name, role, second)

        # planned switchover back: the active stops cleanly and resigns, the passive takes over
        out = subprocess.run([sys.executable, "-m", "opie.cli.main", "ha", "switchover", "--json", "--wait", "20",
                              "--head", heads.ready[second]["api"], "--token-file", heads.ready[second]["token_file"]],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        done = json.loads(out.stdout)
        assert (done["resigned"], done["active"]) == (second, first) and done["new_epoch"] > new["epoch"]
        back = until(lambda: served(st := heads.ha(first)) and st, TAKEOVER_WITHIN)
        assert back["timeline"]["steps"][2]["array"] == "UUU"
        assert heads.ha(second)["role"] == "passive"
        assert asyncio.run(read_back(nbd_port[first], client_ctx, chunks)) == [True] * len(chunks)
    finally:
        heads.stop_all()
        for isu in isus:
            if isu.proc.poll() is None:
                os.kill(isu.proc.pid, signal.SIGCONT)   # a paused one cannot take SIGTERM
            stop(isu.proc)
