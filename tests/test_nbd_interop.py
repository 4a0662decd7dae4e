"""Interop of the ISU's NBD server with real clients: nbdinfo, nbdcopy,
qemu-img (plain and TLS), and TLS refusal for clients outside the cluster."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest

from opie.nbd import tls
from proc_support import random_file

GiB = 1 << 30


def run(*args, check=True, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


def sha256_file(path, limit=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def two_disk_isu(tmp_path, isu_factory):
    return isu_factory([f"{tmp_path}/disk0.img:64M", f"{tmp_path}/disk1.img:32M"])


def test_nbdinfo_json_reports_size_and_capabilities(two_disk_isu):
    out = json.loads(run("nbdinfo", "--json", two_disk_isu.url("disk0")).stdout)
    assert out["protocol"] == "newstyle-fixed"
    assert out["TLS"] is False
    (export,) = out["exports"]
    assert export["export-name"] == "disk0"
    assert export["export-size"] == 64 << 20
    assert export["is_read_only"] is False
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache"):
        assert export[cap] is True, cap
    assert export["block_size_maximum"] >= 1 << 20


def test_nbdinfo_list_names_every_export(two_disk_isu):
    out = json.loads(run("nbdinfo", "--json", "--list", f"nbd://127.0.0.1:{two_disk_isu.port}").stdout)
    sizes = {e["export-name"]: e["export-size"] for e in out["exports"]}
    assert sizes == {"disk0": 64 << 20, "disk1": 32 << 20}


@pytest.mark.parametrize("cap", ["flush", "fua", "trim", "zero"])
def test_nbdinfo_can(two_disk_isu, cap):
    assert run("nbdinfo", "--can", cap, two_disk_isu.url("disk1"), check=False).returncode == 0


def test_nbdinfo_cannot_what_we_do_not_offer(two_disk_isu):
    # fast-zero is not advertised: nbdinfo must say so (exit 2 = false).
    assert run("nbdinfo", "--can", "fast-zero", two_disk_isu.url("disk1"), check=False).returncode == 2


@pytest.mark.slow
def test_nbdcopy_one_gib_in_and_out(tmp_path, isu_factory):
    src = tmp_path / "src.img"
    random_file(src, GiB)
    isu = isu_factory([f"{tmp_path}/big.img:1G"])
    run("nbdcopy", str(src), isu.url("big"))
    run("nbdcopy", isu.url("big"), str(tmp_path / "back.img"))
    want = sha256_file(src)
    assert sha256_file(tmp_path / "back.img") == want
    assert sha256_file(tmp_path / "big.img") == want  # the ISU's own disk holds the bytes
    os.unlink(src)
    os.unlink(tmp_path / "back.img")


def test_qemu_img_convert_and_compare(tmp_path, isu_factory):
    src = tmp_path / "src.img"
    random_file(src, 48 << 20, seed=7)
    isu = isu_factory([f"{tmp_path}/q.img:48M"])
    url = isu.url("q")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), url)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), url, check=False).returncode == 0
    # compare must be able to fail: change one byte behind the server's back
    with open(tmp_path / "q.img", "r+b") as f:
        f.seek(12345)
        b = f.read(1)
        f.seek(12345)
        f.write(bytes([b[0] ^ 0xFF]))
    res = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), url, check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "mismatch at offset 12288" in res.stdout  # the 4 KiB block holding byte 12345


# ---------------------------------------------------------------- TLS
@pytest.fixture
def tls_isu(tmp_path, isu_factory, cluster_tls):
    return isu_factory([f"{tmp_path}/secure.img:16M"], tls_dir=cluster_tls["dir"])


def test_tls_client_with_cluster_certificate_is_served(tls_isu, cluster_tls, tmp_path):
    out = json.loads(run("nbdinfo", "--json", tls_isu.url("secure", cluster_tls["dir"])).stdout)
    assert out["TLS"] is True
    assert out["exports"][0]["export-size"] == 16 << 20
    # data moves over TLS too
    src = tmp_path / "s.img"
    random_file(src, 16 << 20, seed=3)
    run("nbdcopy", str(src), tls_isu.url("secure", cluster_tls["dir"]))
    run("nbdcopy", tls_isu.url("secure", cluster_tls["dir"]), str(tmp_path / "b.img"))
    assert sha256_file(tmp_path / "b.img") == sha256_file(src)


def test_tls_required_plain_client_learns_nothing(tls_isu):
    res = run("nbdinfo", "--list", f"nbd://127.0.0.1:{tls_isu.port}", check=False)
    assert res.returncode != 0
    assert "secure" not in res.stdout + res.stderr
    res = run("nbdinfo", "--json", tls_isu.url("secure"), check=False)
    assert res.returncode != 0
    assert "export-size" not in res.stdout  # asking by name reveals no size or flags either


def test_tls_client_without_certificate_refused(tls_isu, cluster_tls, tmp_path):
    nocert = tmp_path / "nocert"
    nocert.mkdir()
    shutil.copy(os.path.join(cluster_tls["dir"], "ca-cert.pem"), nocert)  # trusts the server, has no identity
    res = run("nbdinfo", "--list", f"nbds://127.0.0.1:{tls_isu.port}?tls-certificates={nocert}", check=False)
    assert res.returncode != 0
    assert "secure" not in res.stdout + res.stderr


def test_tls_client_from_foreign_ca_refused(tls_isu, cluster_tls, tmp_path):
    foreign_ca = tmp_path / "foreign-ca"
    tls.create_ca(foreign_ca, name="Someone else's CA")
    foreign = tmp_path / "foreign"
    tls.issue(foreign_ca, foreign)
    # it even trusts our server's CA: only its own identity is foreign
    shutil.copy(os.path.join(cluster_tls["dir"], "ca-cert.pem"), foreign / "ca-cert.pem")
    res = run("nbdinfo", "--list", f"nbds://127.0.0.1:{tls_isu.port}?tls-certificates={foreign}", check=False)
    assert res.returncode != 0
    assert "secure" not in res.stdout + res.stderr
    deadline = time.monotonic() + 10  # the server logs the refusal after the client saw it
    while "TLS failure" not in tls_isu.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "TLS failure" in tls_isu.log()
