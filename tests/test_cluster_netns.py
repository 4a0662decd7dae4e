"""Issue 6 end to end: real head and ISU agents as hosts in network namespaces.

Topology (lab.netns_lab.NetnsLab): h0 = head (lease pool, ISU registry, API),
h1..h4 = ISUs with no address, h5 = a bare host for the console test. NBD and
the control channel between head and ISUs use TLS with the lab's cluster CA.

Must hold, in order (one lab for the module; each test says what it needs):
1. The 4 ISUs lease distinct pool addresses from the head and apply them; the
   head lists them as new (`opie isu list`); they are adopted through the CLI
   and the API, and each adoption's TXT state change (unconfigured -> ready)
   reaches the head within 1 s; the head, which had no member list, creates
   the array (UUUU); data written to a volume survives a head restart, after
   which the head reassembles the array from discovery alone (head.json
   still lists no members).
2. The serial console over a pty pair drives a real agent: status, set
   address (applied on its interface; the head then discovers it there),
   set name (the TXT shows it), and a malformed request answered with an
   error line that changes nothing.
3. A SIGKILLed member ISU is declared dead by the head within 3 s; the
   others stay alive.
4. With that ISU still down, a restarted head assembles degraded from
   discovery, takes writes, and re-adds the ISU when it returns (discovery
   hands its URI to the member watcher), resyncing what it missed.
Latencies are printed (pytest -s shows them).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from opie.lab.netns_lab import NetnsLab

SUBNET = "10.213.92.0/24"
N_ISUS = 4
CONSOLE_HOST = N_ISUS + 1
VOLUME_BYTES = 8 << 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsLab]:
    lab = NetnsLab(tmp_path_factory.mktemp("netnslab"), isus=N_ISUS, disk_size="128M", subnet=SUBNET,
                   extra_hosts=1, discover_timeout=120)
    with lab:
        lab.up(adopt=False)
        yield lab


def cli(lab: NetnsLab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`opie ARGS` run in the head's namespace against its API."""
    return lab.head_host.run([sys.executable, "-m", "opie.cli.main", *args, "--head", lab.api_url,
                              "--token-file", str(lab.dir / "head" / "api-token")], timeout=timeout)


def isus_by_uuid(lab: NetnsLab) -> dict[str, dict[str, Any]]:
    return {i["uuid"]: i for i in lab.api("GET", "/v1/isus")["isus"]}


def wait_until(what: str, pred: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(step)


def nbd_unix(lab: NetnsLab, export: str) -> str:
    return f"nbd+unix:///{export}?socket={lab.dir / 'head' / 'nbd.sock'}"


def test_isus_lease_are_adopted_array_created_and_reassembled_from_discovery(lab: NetnsLab,
                                                                             tmp_path: Path) -> None:
    isus = lab.lab["isus"]
    pool = {str(a) for a in lab.pool}
    addresses = [i["address"] for i in isus]
    assert len(set(addresses)) == N_ISUS and set(addresses) <= pool, addresses
    for index, isu in enumerate(isus, start=1):
        assert lab.net.host(index).addresses() == [ipaddress.IPv4Interface(f"{isu['address']}/24")]
        saved = json.loads((lab.dir / f"isu{index}" / "isu.json").read_text())
        assert (saved["address"], saved["address_source"]) == (f"{isu['address']}/24", "lease")
        assert saved["head"] == f"{lab.head_address}:8080"

    listed = wait_until("all 4 ISUs discovered", lambda: (
        lambda r: r if r.returncode == 0 and len(json.loads(r.stdout)) == N_ISUS else None)(
            cli(lab, "isu", "list", "--json")), timeout=15, step=0.3)
    seen = {i["uuid"]: i for i in json.loads(listed.stdout)}
    assert set(seen) == {i["uuid"] for i in isus}
    assert {(i["class"], i["alive"], i["state"]) for i in seen.values()} == {("new", True, "unconfigured")}
    assert {seen[i["uuid"]]["address"] for i in isus} == set(addresses)
    # Before the array exists only /v1/isus answers.
    with pytest.raises(Exception, match="503"):
        lab.api("GET", "/v1/status")

    first = cli(lab, "isu", "adopt", isus[0]["uuid"], "--as", "member")
    assert first.returncode == 0, first.stderr
    assert f"adopted {isus[0]['uuid']} as member" in first.stdout
    for isu in isus[1:]:
        t0 = time.time()
        reply = lab.api("POST", f"/v1/isus/{isu['uuid']}/adopt", {"role": "member"})
        assert (reply["role"], reply["exports"], reply["config_gen"]) == ("member", ["disk0"], 1)
        view = wait_until("TXT state ready", lambda: (lambda v: v if v["state"] == "ready" else None)(
            isus_by_uuid(lab)[isu["uuid"]]), timeout=1.0)
        latency = view["events"]["changed"] - t0
        print(f"TXT state change (unconfigured -> ready) seen by the head {latency:.3f} s after the adopt call")
        assert latency < 1.0 and view["class"] == "member"
    isu_cfg = json.loads((lab.dir / "isu1" / "isu.json").read_text())
    assert (isu_cfg["cluster"], isu_cfg["role"], isu_cfg["member_exports"]) == (lab.cluster_id, "member", ["disk0"])

    ready = lab.wait_head_ready(timeout=120)
    assert ready["array"] == "U" * N_ISUS
    lab.api("POST", "/v1/volumes", {"name": "vol0", "size": VOLUME_BYTES})
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(VOLUME_BYTES))
    subprocess.run(["nbdcopy", "--flush", str(data), nbd_unix(lab, "vol0")], check=True, timeout=60)

    t0 = time.monotonic()
    lab.stop_head()
    head_cfg = json.loads((lab.dir / "head" / "head.json").read_text())
    assert head_cfg["members"] == [] and head_cfg["discover"] is True
    assert sorted(i["uuid"] for i in head_cfg["isus"]) == sorted(i["uuid"] for i in isus)
    lab.start_head()
    ready = lab.wait_head_ready(timeout=120)
    print(f"head restart to array assembled from discovery: {time.monotonic() - t0:.2f} s")
    assert ready["array"] == "U" * N_ISUS
    status = lab.api("GET", "/v1/status")
    assert status["array"]["state"] == "U" * N_ISUS
    assert {m["name"] for m in status["array"]["members"]} == {
        f"nbds://{i['address']}:10809/disk0" for i in isus}
    back = tmp_path / "back.bin"
    subprocess.run(["nbdcopy", nbd_unix(lab, "vol0"), str(back)], check=True, timeout=60)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data.read_bytes()).digest()
    assert {i["class"] for i in isus_by_uuid(lab).values()} == {"member"}


def test_console_over_a_pty_drives_the_real_agent(lab: NetnsLab, tmp_path: Path) -> None:
    isu_end, admin_end = tmp_path / "ttyISU", tmp_path / "ttyADMIN"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={isu_end}", f"pty,raw,echo=0,link={admin_end}"],
                             stderr=subprocess.DEVNULL)
    try:
        wait_until("socat pty pair", lambda: isu_end.exists() and admin_end.exists(), timeout=5)
        info = lab.start_isu(CONSOLE_HOST, extra=["--console", str(isu_end)])
        host = lab.net.host(CONSOLE_HOST)
        assert host.addresses() == [] and info["address"] is None

        def console(*commands: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "opie.cli.main", "isu", "console", str(admin_end), *commands],
                                  capture_output=True, text=True, timeout=30)

        out = console("status")
        assert out.returncode == 0, out.stderr
        assert "address: -" in out.stdout and "state: unconfigured" in out.stdout
        assert f"uuid: {info['uuid']}" in out.stdout

        address = f"{lab.subnet.network_address + 60}/24"
        t0 = time.time()
        out = console(f"set address {address}")
        assert out.returncode == 0 and f"ok address {address}" in out.stdout, out.stdout + out.stderr
        assert host.addresses() == [ipaddress.IPv4Interface(address)]
        view = wait_until("console-addressed ISU discovered", lambda: isus_by_uuid(lab).get(info["uuid"]),
                          timeout=10, step=0.2)
        print(f"console 'set address' to discovered by the head: {view['events']['found'] - t0:.2f} s "
              "(includes starting the admin CLI and mDNS probing)")
        assert (view["address"], view["class"], view["state"]) == (address.split("/")[0], "new", "unconfigured")

        out = console("set name shelf7", "status")
        assert out.returncode == 0 and "name: shelf7" in out.stdout, out.stdout
        gen = view["config_gen"]
        named = wait_until("TXT name", lambda: (lambda v: v if v["name"] == "shelf7" else None)(
            isus_by_uuid(lab)[info["uuid"]]), timeout=1.0)
        assert named["config_gen"] > gen

        state_file = lab.dir / f"isu{CONSOLE_HOST}" / "isu.json"
        before = state_file.read_bytes()
        out = console("set address 10.213.92.300/24")
        assert out.returncode == 1
        assert out.stdout.startswith("error:") and "nothing changed" in out.stdout, out.stdout
        assert state_file.read_bytes() == before
        assert host.addresses() == [ipaddress.IPv4Interface(address)]
        assert console("status").returncode == 0
    finally:
        socat.terminate()
        socat.wait(5)


def test_sigkill_of_a_member_isu_is_noticed_within_3_seconds(lab: NetnsLab) -> None:
    victim = lab.lab["isus"][-1]
    others = [i["uuid"] for i in lab.lab["isus"][:-1]]
    assert isus_by_uuid(lab)[victim["uuid"]]["alive"]
    t0 = time.time()
    os.kill(victim["pid"], signal.SIGKILL)
    view = wait_until("ISU declared dead", lambda: (lambda v: v if not v["alive"] else None)(
        isus_by_uuid(lab)[victim["uuid"]]), timeout=5, step=0.1)
    latency = view["events"]["dead"] - t0
    print(f"SIGKILLed ISU declared dead by the head after {latency:.2f} s")
    assert latency < 3.0
    now = isus_by_uuid(lab)
    assert all(now[u]["alive"] for u in others)


def test_head_boots_degraded_without_a_member_and_re_adds_it_when_it_returns(lab: NetnsLab,
                                                                             tmp_path: Path) -> None:
    """The SIGKILLed ISU (test 3) is still down: a restarted head waits its
    (shortened) discovery timeout, assembles degraded from the three live
    members, takes writes, and re-adds the fourth when it comes back, resyncing
    what it missed; then the data reads back even without another member."""
    from opie.head import config as head_config  # noqa: PLC0415
    victim = lab.lab["isus"][-1]
    victim_index = len(lab.lab["isus"])
    assert not isus_by_uuid(lab)[victim["uuid"]]["alive"]
    home = lab.dir / "head"
    lab.stop_head()
    cfg = head_config.load(home)
    cfg.discover_timeout = 5
    head_config.save(home, cfg)
    lab.start_head()
    ready = lab.wait_head_ready(timeout=120)
    assert sorted(ready["array"]) == sorted("U" * (N_ISUS - 1) + "_")

    data = tmp_path / "degraded.bin"
    data.write_bytes(os.urandom(VOLUME_BYTES))
    subprocess.run(["nbdcopy", "--flush", str(data), nbd_unix(lab, "vol0")], check=True, timeout=60)

    t0 = time.monotonic()
    back_isu = lab.start_isu(victim_index)
    assert back_isu["uuid"] == victim["uuid"]
    status = wait_until("the returned member re-added and resynced",
                        lambda: (lambda s: s if s["array"]["state"] == "U" * N_ISUS else None)(
                            lab.api("GET", "/v1/status")), timeout=60, step=0.25)
    print(f"returned member back in sync after {time.monotonic() - t0:.2f} s")
    assert f"nbds://{back_isu['address']}:10809/disk0" in {m["name"] for m in status["array"]["members"]}

    # The re-added member must hold what it missed: lose another member, read back.
    other = lab.lab["isus"][0]
    os.kill(other["pid"], signal.SIGKILL)
    back = tmp_path / "back.bin"
    subprocess.run(["nbdcopy", nbd_unix(lab, "vol0"), str(back)], check=True, timeout=120)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(data.read_bytes()).digest()
