"""The ISU agent's cluster services in one process on loopback, with real kernel uevents.

- Announcement: an independent python-zeroconf browser sees the agent's TXT
  (state unconfigured, disks, capacity, version) and its goodbye at stop.
- Control channel (isu/control.py, mutual TLS; the ISU holds an ISU's
  certificate, the client a head's): status; a join is durable in isu.json,
  bumps the config generation and shows in the TXT within 1 s (state
  ready, cluster, role); a join for another cluster, a bad role and a
  malformed line are refused and change nothing.
- udev: LOOP_CTL_ADD of loop4213 (test_udev_loop's slot) makes it an unassigned disk. Then the
  kernel name is made to stand for the served member disk (the mapping a
  hot-pluggable block device would have; a loop device cannot be removed
  while the agent holds it open), and LOOP_CTL_REMOVE fails that disk at
  once: NBD reads get EIO and TXT state `degraded` reaches the browser
  within 1 s.
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import queue
import time
from pathlib import Path

import pytest

from opie.discovery.browse import DiscoveryEvent, EventKind, IsuBrowser
from opie.isu import control
from opie.isu.agent import ISUAgent
from opie.isu.errors import ControlError
from opie.isu.services import IsuServices, ServiceOptions
from opie.nbd import tls
from opie.nbd.client import NBDClient
from test_udev_loop import LOOP_CTL_ADD, LOOP_CTL_REMOVE, NAME, loop_ctl, loop_slot  # noqa: F401 (fixture)

DISK_BYTES = 4 << 20


class Seen:
    """What the independent browser reported, with arrival times."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[float, DiscoveryEvent]] = queue.Queue()

    def __call__(self, event: DiscoveryEvent) -> None:
        self.q.put((time.time(), event))

    async def wait(self, uuid: str, kind: EventKind, timeout: float, **txt: object) -> tuple[float, DiscoveryEvent]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                at, ev = self.q.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.01)
                continue
            if ev.record.uuid == uuid and ev.kind is kind and all(
                    getattr(ev.record, k) == v for k, v in txt.items()):
                return at, ev
        raise AssertionError(f"browser saw no {kind.value} {txt} for {uuid} within {timeout} s")


async def raw_request(port: int, line: bytes, ctx) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    writer.write(line)
    await writer.drain()
    reply = json.loads(await reader.readline())
    writer.close()
    return reply


def test_announce_control_join_and_udev_disk_events(tmp_path: Path, loop_slot: None, cluster_tls: dict) -> None:
    seen = Seen()
    browser = IsuBrowser("127.0.0.1", "c1", seen)
    browser.start()   # outside the event loop: zeroconf runs its own loop thread
    agent = ISUAgent(str(tmp_path / "isu"), [f"{tmp_path}/disk0.img:{DISK_BYTES}"], "127.0.0.1:0",
                     tls_dir=cluster_tls["isu"])
    head = tls.client_context(cluster_tls["dir"])
    agent.services = IsuServices(agent, ServiceOptions(announce="127.0.0.1", watch_disks=NAME, control_port=0))
    state_file = tmp_path / "isu" / "isu.json"

    async def scenario() -> None:
        await agent.start()
        try:
            services = agent.services
            _, found = await seen.wait(agent.uuid, EventKind.FOUND, 5)
            r = found.record
            assert (r.state, r.disks, r.capacity, r.cluster, r.role, r.port) == (
                "unconfigured", 1, DISK_BYTES, "", "", agent.port)
            assert r.version and r.hb_port
            port = services.control_port
            status = await control.call("127.0.0.1", {"op": "status"}, head, port=port)
            assert (status["uuid"], status["exports"], status["nbd_port"]) == (agent.uuid, ["disk0"], agent.port)

            before = state_file.read_bytes()
            assert (await raw_request(port, b"not json\n", head))["ok"] is False
            with pytest.raises(ControlError, match="role"):
                await control.call("127.0.0.1", {"op": "join", "cluster": "c1", "role": "boss"}, head, port=port)
            with pytest.raises(ControlError, match="exports"):
                await control.call("127.0.0.1", {"op": "join", "cluster": "c1", "role": "member",
                                                 "exports": ["nope"]}, head, port=port)
            assert state_file.read_bytes() == before

            t0 = time.time()
            reply = await control.call("127.0.0.1", {"op": "join", "cluster": "c1", "role": "member",
                                                     "head": "127.0.0.1:8080", "exports": ["disk0"]}, head, port=port)
            assert reply["config_gen"] == 1
            at, _ = await seen.wait(agent.uuid, EventKind.CHANGED, 1.0, state="ready", role="member",
                                    cluster="c1", config_gen=1)
            print(f"join -> TXT (state ready, role member) seen by a browser after {at - t0:.3f} s")
            saved = json.loads(state_file.read_text())
            assert (saved["cluster"], saved["role"], saved["member_exports"], saved["config_gen"]) == (
                "c1", "member", ["disk0"], 1)
            before = state_file.read_bytes()
            with pytest.raises(ControlError, match="belongs to cluster c1"):
                await control.call("127.0.0.1", {"op": "join", "cluster": "c2", "role": "member"}, head, port=port)
            assert state_file.read_bytes() == before

            t0 = time.monotonic()
            loop_ctl(LOOP_CTL_ADD)
            while NAME not in services.status()["unassigned_disks"]:
                assert time.monotonic() - t0 < 5, "new disk never listed as unassigned"
                await asyncio.sleep(0.01)
            print(f"new disk {NAME} listed as unassigned after {time.monotonic() - t0:.3f} s")
            status = await control.call("127.0.0.1", {"op": "status"}, head, port=port)
            assert status["unassigned_disks"] == [NAME] and status["state"] == "ready"

            services._devices[NAME] = "disk0"     # NAME now stands for the served member disk
            services.roster.assign(NAME)
            t1 = time.time()
            loop_ctl(LOOP_CTL_REMOVE)
            at, _ = await seen.wait(agent.uuid, EventKind.CHANGED, 1.0, state="degraded")
            print(f"member disk removed -> TXT state degraded seen by a browser after {at - t1:.3f} s")
            assert (await control.call("127.0.0.1", {"op": "status"}, head, port=port))["failed_disks"] == ["disk0"]
            client = await NBDClient.connect("127.0.0.1", agent.port, "disk0", tls_context=head, timeout=5)
            try:
                with pytest.raises(OSError) as exc:
                    await client.read(0, 4096)
                assert exc.value.errno == errno.EIO
            finally:
                await client.close()
        finally:
            await agent.stop()
        await seen.wait(agent.uuid, EventKind.GONE, 3)

    try:
        asyncio.run(scenario())
    finally:
        agent.close_disks()
        browser.close()
