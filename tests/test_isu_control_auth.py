"""Issue 9, 3.1: only a head may adopt an ISU through its control channel.

A real ISU process (`opie isu serve --announce 127.0.0.1 --tls-dir` with a
certificate of role isu) serves its control channel with mutual TLS. Three
clients that are not a head each try a raw `join` and a whole adoption
(the head's own `Cluster.adopt`, with that client's TLS, over real
discovery and heartbeats): a client holding an ISU's certificate, a TLS
client with no certificate, and a plain-TCP client. Each is refused and the
ISU's state directory (isu.json and the rest, logs aside) stays byte for
byte as it was. Then the same adoption with a head's certificate succeeds.
The channel listens on the announced address only: another loopback
address gets no answer.

The head around `Cluster` is a stand-in with the few attributes adoption
reads (config, state dir, client TLS, no array); the adoption logic, the
registry, the control channel and the ISU are the real ones.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from opie.head import config as head_config
from opie.head.cluster import Cluster
from opie.head.daemon import HeadError
from opie.isu import control
from opie.isu.errors import ControlError
from opie.nbd import tls

CLUSTER = "c1"
JOIN = {"op": "join", "cluster": CLUSTER, "role": "member", "head": "127.0.0.1:8080", "exports": ["disk0"]}


def snapshot(state_dir: Path) -> dict[str, bytes]:
    """Every file of the ISU's state directory but its log."""
    return {str(p.relative_to(state_dir)): p.read_bytes() for p in sorted(state_dir.rglob("*"))
            if p.is_file() and p.suffix != ".log"}


class HeadStandIn:
    """What `Cluster` reads of a head: its config, state dir and client TLS; no array yet."""

    def __init__(self, state_dir: Path, cfg: head_config.HeadConfig) -> None:
        self.state_dir, self.cfg = state_dir, cfg
        self.client_tls = None
        self.array = self.watcher = self.stopping = None


async def discovered(cluster: Cluster, uuid: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ((v := (cluster.registry.isus().get(uuid) if cluster.registry else None)) and v.alive):
        assert time.monotonic() < deadline, f"ISU {uuid} not discovered within {timeout} s"
        await asyncio.sleep(0.05)


def test_only_a_head_certificate_joins_or_adopts(tmp_path: Path, cluster_tls: dict, isu_factory) -> None:
    isu = isu_factory([f"{tmp_path}/disk0.img:4M"], name="isu", tls_dir=cluster_tls["isu"],
                      extra=["--announce", "127.0.0.1", "--control-port", "0"])
    port = int(isu.ready["control"].rsplit(":", 1)[1])
    state = tmp_path / "isu"
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(Path(cluster_tls["ca"]) / tls.CA_CERT, ca_only / tls.CA_CERT)
    refused = {"an ISU certificate": tls.client_context(cluster_tls["isu"]),
               "no certificate": tls.client_context(ca_only),
               "plain TCP": None}
    head_dir = tmp_path / "head"
    cfg = head_config.HeadConfig(members=[], tls_dir=cluster_tls["dir"], mount_root=str(tmp_path / "mnt"),
                                 api_listen="127.0.0.1:8080", discover=True, cluster_id=CLUSTER,
                                 discover_address="127.0.0.1")
    head_config.save(head_dir, cfg)
    head = HeadStandIn(head_dir, cfg)

    async def scenario() -> None:
        before = snapshot(state)
        assert json.loads(before["isu.json"]).get("cluster") is None
        for who, ctx in refused.items():
            with pytest.raises(ControlError):
                await control.call("127.0.0.1", JOIN, ctx, port=port)
            assert snapshot(state) == before, f"a join by {who} changed the ISU's state"

        cluster = Cluster(head)
        cluster.control_port = port
        await asyncio.get_running_loop().run_in_executor(None, cluster.start)
        try:
            await discovered(cluster, isu.uuid)
            for who, ctx in refused.items():
                head.client_tls = ctx
                with pytest.raises(HeadError) as exc:
                    await cluster.adopt(isu.uuid, "member")
                assert exc.value.status == 502, f"{who}: {exc.value}"
                assert snapshot(state) == before, f"an adoption by {who} changed the ISU's state"
                assert head_config.load(head_dir).isus == []
            head.client_tls = tls.client_context(cluster_tls["dir"])
            reply = await cluster.adopt(isu.uuid, "member")
        finally:
            await asyncio.get_running_loop().run_in_executor(None, cluster.close)
        assert (reply["role"], reply["exports"], reply["config_gen"]) == ("member", ["disk0"], 1)
        saved = json.loads((state / "isu.json").read_text())
        assert (saved["cluster"], saved["role"], saved["config_gen"]) == (CLUSTER, "member", 1)
        assert [i["uuid"] for i in head_config.load(head_dir).isus] == [isu.uuid]

    asyncio.run(scenario())
    with pytest.raises(ConnectionRefusedError):   # bound to the announced address, not 0.0.0.0
        socket.create_connection(("127.0.0.2", port), timeout=5).close()
