"""The ISU agent as an admin runs it: identity, disk specs, refusals that
change nothing, and a clean stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from proc_support import start_isu, stop


def opie(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "opie.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_identity_survives_restart(tmp_path):
    state = str(tmp_path / "st")
    a = start_isu(state, [f"{tmp_path}/d0.img:4M"])
    first = a.uuid
    stop(a.proc)
    b = start_isu(state, [f"{tmp_path}/d0.img"])
    try:
        assert b.uuid == first
        assert json.load(open(os.path.join(state, "isu.json")))["uuid"] == first
    finally:
        stop(b.proc)


def test_sparse_disk_created_and_block_states_reported(tmp_path, isu_factory):
    isu = isu_factory([f"{tmp_path}/a.img:64M", f"{tmp_path}/b.img:1G"])
    st = os.stat(tmp_path / "b.img")
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 < 1 << 20  # sparse: nothing allocated yet
    disks = {d["name"]: d for d in isu.ready["disks"]}
    assert disks["a"]["state"] == "online" and disks["b"]["size"] == 1 << 30
    assert isu.ready["exports"] == [f"nbd://127.0.0.1:{isu.port}/a", f"nbd://127.0.0.1:{isu.port}/b"]


def test_existing_disk_is_never_resized(tmp_path):
    disk = tmp_path / "keep.img"
    disk.write_bytes(b"precious" * 1000)
    res = opie("isu", "serve", "--disk", f"{disk}:1G", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st"))
    assert res.returncode == 2
    assert "refusing to resize" in res.stderr
    assert disk.read_bytes() == b"precious" * 1000


@pytest.mark.parametrize("disks,message", [
    (["{d}/x.img:4M", "{d}/sub/x.raw:4M"], "same name"),
    (["{d}/missing.img"], "give a size"),
    (["{d}/bad.img:12Q"], "invalid size"),
    (["{d}/nodir/y.img:4M"], "does not exist"),
])
def test_bad_disk_specs_refused_before_anything_is_served(tmp_path, disks, message):
    (tmp_path / "sub").mkdir()
    args = ["isu", "serve", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "st")]
    for d in disks:
        args += ["--disk", d.format(d=tmp_path)]
    res = opie(*args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "x.img").exists()  # nothing created when the whole start is refused


def test_corrupt_identity_refused(tmp_path):
    st = tmp_path / "st"
    st.mkdir()
    (st / "isu.json").write_text('{"magic": "something-else"}')
    res = opie("isu", "serve", "--disk", f"{tmp_path}/d.img:4M", "--listen", "127.0.0.1:0", "--state-dir", str(st))
    assert res.returncode == 2
    assert "expected magic 'opie-isu'" in res.stderr
    assert (st / "isu.json").read_text() == '{"magic": "something-else"}'


def test_sigterm_stops_cleanly(tmp_path):
    isu = start_isu(str(tmp_path / "st"), [f"{tmp_path}/d.img:4M"])
    isu.proc.send_signal(signal.SIGTERM)
    out, _ = isu.proc.communicate(timeout=10)
    assert isu.proc.returncode == 0
    assert b'"event": "stopped"' in out


def test_help_reads_like_a_man_page():
    res = opie("isu", "serve", "--help")
    assert res.returncode == 0
    for word in ("--disk", "PATH[:SIZE]", "--tls-dir", "sparse", "never resized", "example", "--insecure",
                 "INSECURE"):
        assert word in res.stdout
