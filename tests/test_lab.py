"""`opie lab up` / `down` as an admin uses them: lab.json, TLS exports that
real clients reach, refusal to start twice, data surviving a restart, and
Ctrl-C stopping everything."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from opie.lab.runner import _alive


def opie(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "opie.cli.main", *args], capture_output=True, text=True, timeout=timeout)


def test_lab_up_down_restart_keeps_data(tmp_path):
    d = tmp_path / "lab"
    res = opie("lab", "up", "--dir", str(d), "--isus", "3", "--disk-size", "64M", "--no-head", "--detach")
    assert res.returncode == 0, res.stderr
    lab = json.loads((d / "lab.json").read_text())
    try:
        assert len(lab["isus"]) == 3
        assert os.path.isdir(lab["tls_certificates"])
        assert "nbdinfo" in res.stdout and "opie lab down" in res.stdout
        first = lab["isus"][0]
        assert all(_alive(i["pid"]) for i in lab["isus"])
        url = f"{first['exports'][0]}?tls-certificates={lab['tls_certificates']}"
        assert url.startswith("nbds://127.0.0.1:")
        info = json.loads(subprocess.run(["nbdinfo", "--json", url], capture_output=True, text=True,
                                         check=True, timeout=30).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 64 << 20
        # plain NBD to a lab ISU is refused
        plain = first["exports"][0].replace("nbds://", "nbd://")
        assert subprocess.run(["nbdinfo", plain], capture_output=True, timeout=30).returncode != 0
        payload = tmp_path / "p.img"
        payload.write_bytes(os.urandom(1 << 20) * 64)
        subprocess.run(["nbdcopy", "--flush", str(payload), url], check=True, timeout=60)
        again = opie("lab", "up", "--dir", str(d), "--detach")
        assert again.returncode == 2 and "already running" in again.stderr
    finally:
        res = opie("lab", "down", "--dir", str(d))
    assert res.returncode == 0, res.stderr
    assert not any(_alive(i["pid"]) for i in lab["isus"])
    # restart: same identities, same data
    res = opie("lab", "up", "--dir", str(d), "--isus", "3", "--disk-size", "64M", "--no-head", "--detach")
    assert res.returncode == 0, res.stderr
    try:
        lab2 = json.loads((d / "lab.json").read_text())
        assert [i["uuid"] for i in lab2["isus"]] == [i["uuid"] for i in lab["isus"]]
        url = f"{lab2['isus'][0]['exports'][0]}?tls-certificates={lab2['tls_certificates']}"
        subprocess.run(["nbdcopy", url, str(tmp_path / "back.img")], check=True, timeout=60)
        assert (tmp_path / "back.img").read_bytes() == payload.read_bytes()
    finally:
        opie("lab", "down", "--dir", str(d))


def test_lab_up_foreground_stops_on_ctrl_c(tmp_path):
    d = tmp_path / "lab"
    proc = subprocess.Popen([sys.executable, "-m", "opie.cli.main", "lab", "up", "--dir", str(d), "--isus", "2",
                             "--disk-size", "16M", "--no-head"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        lab = None
        while time.monotonic() < deadline:
            if (d / "lab.json").exists():
                lab = json.loads((d / "lab.json").read_text())
                if len(lab["isus"]) == 2:
                    break
            time.sleep(0.1)
        assert lab and len(lab["isus"]) == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert b"Stop with Ctrl-C" in out
        assert not any(_alive(i["pid"]) for i in lab["isus"])
        assert "stopped" in json.loads((d / "lab.json").read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run([sys.executable, "-m", "opie.cli.main", "lab", "down", "--dir", str(d)], timeout=30)


@pytest.mark.parametrize("args,msg", [(["--isus", "0"], "at least one ISU"), (["--disk-size", "lots"], "invalid size")])
def test_lab_bad_input(tmp_path, args, msg):
    res = opie("lab", "up", "--dir", str(tmp_path / "lab"), *args, "--detach")
    assert res.returncode == 2
    assert msg in res.stderr
    assert not (tmp_path / "lab" / "lab.json").exists()
