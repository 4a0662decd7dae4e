"""Issue 9, 3.2: no plain (non-TLS) listener on a network address unless the
admin asks for it by name.

- ISU: `opie isu serve --listen 0.0.0.0:...` without --tls-dir is refused
  with a clear error before anything is served or created; with
  `--insecure` it serves, and says so at WARNING. A control channel
  without TLS on a network address is refused the same way. Loopback
  without TLS stays allowed (most tests run so).
- Head: a network api_listen (the API is plain HTTP) or a network
  nbd_listen without tls_dir is a config error naming the field and the
  `insecure` key; `opie head run` exits 2 and starts nothing. With
  `"insecure": true` it runs and logs a WARNING.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opie.head import config as head_config
from opie.isu.agent import ISUAgent
from opie.isu.services import IsuServices, ServiceOptions
from proc_support import stop

NETWORK_ADDRESS = "192.0.2.1"   # TEST-NET-1: never bound nor contacted, only vetted


def test_isu_refuses_plain_nbd_on_a_network_address(tmp_path: Path, isu_factory) -> None:
    with pytest.raises(RuntimeError, match="exited with 2") as exc:
        isu_factory([f"{tmp_path}/d.img:4M"], name="st", extra=["--listen", "0.0.0.0:0"])
    assert "--insecure" in str(exc.value) and "Traceback" not in str(exc.value)
    assert not (tmp_path / "d.img").exists() and not (tmp_path / "st" / "isu.json").exists()


def test_isu_serves_plain_nbd_on_a_network_address_with_insecure(tmp_path: Path, isu_factory) -> None:
    isu = isu_factory([f"{tmp_path}/d.img:4M"], name="st", extra=["--listen", "0.0.0.0:0", "--insecure"])
    assert isu.ready["listen"].startswith("0.0.0.0:")
    warnings = [line for line in isu.log().splitlines() if " WARNING " in line and "insecure" in line]
    assert warnings, isu.log()


def test_isu_refuses_a_plain_control_channel_on_a_network_address(tmp_path: Path) -> None:
    agent = ISUAgent(str(tmp_path / "st"), [f"{tmp_path}/d.img:4M"], "127.0.0.1:0")
    try:
        with pytest.raises(ValueError, match="control channel.*insecure"):
            IsuServices(agent, ServiceOptions(announce=NETWORK_ADDRESS))
        IsuServices(agent, ServiceOptions(announce="127.0.0.1"))     # loopback: fine
    finally:
        agent.close_disks()


def head_json(**fields) -> dict:
    body = head_config.HeadConfig(members=["nbd://127.0.0.1:1/a", "nbd://127.0.0.1:2/b"], tls_dir=None,
                                  mount_root="/tmp/unused").to_json()
    return {**body, **fields}


@pytest.mark.parametrize("fields,field", [
    (dict(api_listen="0.0.0.0:8080"), "api_listen"),
    (dict(api_listen=f"{NETWORK_ADDRESS}:8080", tls_dir="/etc/opie/tls"), "api_listen"),  # HTTP has no TLS
    (dict(nbd_listen=f"{NETWORK_ADDRESS}:10809"), "nbd_listen"),
    (dict(nbd_listen="[::]:10809"), "nbd_listen"),
])
def test_head_config_refuses_plain_network_listeners(fields: dict, field: str) -> None:
    with pytest.raises(head_config.ConfigError, match=f"{field}.*insecure"):
        head_config.from_json(head_json(**fields))


@pytest.mark.parametrize("fields", [
    dict(),                                                                   # loopback
    dict(api_listen="localhost:8080", nbd_listen="[::1]:10809"),
    dict(nbd_listen=f"{NETWORK_ADDRESS}:10809", tls_dir="/etc/opie/tls"),     # NBD with TLS
    dict(api_listen="0.0.0.0:8080", nbd_listen="0.0.0.0:10809", insecure=True),
])
def test_head_config_allows_loopback_tls_or_insecure(fields: dict) -> None:
    head_config.from_json(head_json(**fields))


def start_head(home: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, dict | None]:
    """`opie head run`: (process, its ready line), or (exited process, None)."""
    out, err = open(home / "head.out", "wb"), open(home / "head.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "opie.cli.main", "-v", "head", "run", "--state-dir", str(home)],
                            stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    out.close()
    err.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in (home / "head.out").read_bytes().splitlines():
            if line.startswith(b"{") and json.loads(line).get("event") == "ready":
                return proc, json.loads(line)
        if proc.poll() is not None:
            return proc, None
        time.sleep(0.05)
    stop(proc)
    raise AssertionError(f"head neither ready nor exited in {timeout} s:\n{(home / 'head.log').read_text()[-2000:]}")


def test_head_run_refuses_then_allows_with_insecure(tmp_path: Path, isu_factory) -> None:
    isus = [isu_factory([f"{tmp_path}/d{i}.img:16M"], name=f"isu{i}") for i in range(3)]
    home = tmp_path / "head"
    home.mkdir()
    cfg = head_json(members=[i.url("d" + str(n)) for n, i in enumerate(isus)], mount_root=str(tmp_path / "mnt"),
                    create_array=True, assume_clean=True, api_listen="0.0.0.0:0")
    (home / head_config.FILENAME).write_text(json.dumps(cfg))
    proc, ready = start_head(home)
    try:
        assert ready is None, "the head served its API on 0.0.0.0 over plain HTTP"
        assert proc.returncode == 2
        log = (home / "head.log").read_text()
        assert "api_listen" in log and "insecure" in log and "Traceback" not in log
        assert not (home / "api-token").exists()
    finally:
        stop(proc)

    (home / head_config.FILENAME).write_text(json.dumps({**cfg, "insecure": True}))
    proc, ready = start_head(home)
    try:
        assert ready is not None, (home / "head.log").read_text()[-2000:]
        assert ready["array"] == "UUU"
        warnings = [line for line in (home / "head.log").read_text().splitlines()
                    if " WARNING " in line and "insecure" in line and "api_listen" in line]
        assert warnings, (home / "head.log").read_text()[-2000:]
    finally:
        stop(proc)
    assert proc.returncode == 0
