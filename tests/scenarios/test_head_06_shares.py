"""Scenario head-06: the lab's share of the RAID5 volume, used by real
clients (smbclient, libnfs-utils).

Must hold: a 200 MiB random file put over SMB comes back equal over SMB and
over NFSv4; a wrong password is refused; after a snapshot and an overwrite,
the SMB client lists the previous version and reads its old contents; a
share added while a client session stays connected is applied without
dropping it; a malformed share is refused with smb.conf unchanged.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

from scenario_support import sha256_of, wait_until

MiB = 1 << 20


def smb(entry, *cmds, password=None, timeout=300):
    host_port = entry["url"].split("://", 1)[1]
    hp, _, name = host_port.partition("/")
    host, _, port = hp.rpartition(":")
    return subprocess.run(["smbclient", f"//{host}/{name}", "-p", port, "-U",
                           f"{entry['user']}%{password or entry['password']}", "-c", "; ".join(cmds)],
                          capture_output=True, text=True, timeout=timeout)


def test_shares_on_the_raid5_volume(head_lab, tmp_path):
    lab, api = head_lab
    entries = {e["protocol"]: e for e in lab.lab["shares"] if e["name"] == "vol0"}
    s, n = entries["smb"], entries["nfs"]
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for i in range(200):
            f.write(hashlib.sha512(f"{i}".encode()).digest() * (MiB // 64))
    want = sha256_of(src)

    res = smb(s, f"put {src} s06big", f"get s06big {tmp_path / 'back'}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert sha256_of(tmp_path / "back") == want
    assert sha256_of(lab.dir / "mnt" / "vol0" / "s06big") == want  # on the RAID5 volume itself

    nport = n["url"].rsplit(":", 1)[1].split("/")[0]
    subprocess.run(["nfs-cp", f"nfs://127.0.0.1/vol0/s06big?version=4&nfsport={nport}", str(tmp_path / "nfs")],
                   check=True, capture_output=True, timeout=300)
    assert sha256_of(tmp_path / "nfs") == want

    bad = smb(s, "ls", password="not-the-password")
    assert bad.returncode != 0 and "NT_STATUS_LOGON_FAILURE" in bad.stdout + bad.stderr

    # previous versions
    (tmp_path / "v1").write_bytes(b"version one\n" * 1000)
    assert smb(s, f"put {tmp_path / 'v1'} s06doc").returncode == 0
    api.call("POST", "/v1/snapshots", {"volume": "vol0", "name": "s06"})
    (tmp_path / "v2").write_bytes(b"version two\n" * 1000)
    assert smb(s, f"put {tmp_path / 'v2'} s06doc").returncode == 0
    info = smb(s, "allinfo s06doc")
    gmt = [line.strip() for line in info.stdout.splitlines() if line.strip().startswith("@GMT-")]
    assert gmt, info.stdout
    res = smb(s, f"get {gmt[0]}/s06doc {tmp_path / 'old'}", f"get s06doc {tmp_path / 'new'}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "old").read_bytes() == b"version one\n" * 1000
    assert (tmp_path / "new").read_bytes() == b"version two\n" * 1000

    # a share added while a session stays connected
    host, port = s["url"].split("://")[1].split("/")[0].rsplit(":", 1)
    session = subprocess.Popen(["smbclient", f"//{host}/vol0", "-p", port, "-U", f"{s['user']}%{s['password']}"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        session.stdin.write("ls\n")
        session.stdin.flush()
        time.sleep(1)
        add = subprocess.run([sys.executable, "-m", "opie.cli.main", "share", "add", "s06ro", "--volume", "vol0",
                              "--path", "s06ro", "--read-only", "--user", s["user"], "--lab", str(lab.dir)],
                             capture_output=True, text=True, timeout=60)
        assert add.returncode == 0, add.stderr
        ro = dict(s, url=s["url"].rsplit("/", 1)[0] + "/s06ro")
        assert "NT_STATUS_ACCESS_DENIED" in smb(ro, f"put {tmp_path / 'v1'} x").stdout
        session.stdin.write(f"put {tmp_path / 'v2'} s06after\nexit\n")
        session.stdin.flush()
        out, _ = session.communicate(timeout=60)
        assert session.returncode == 0, out
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    wait_until(lambda: (lab.dir / "mnt" / "vol0" / "s06after").exists(), 10, "file from the old session")

    # bad input: refused, smb.conf unchanged
    conf = lab.dir / "head" / "shares" / "smb" / "smb.conf"
    before = conf.read_bytes()
    res = subprocess.run([sys.executable, "-m", "opie.cli.main", "share", "add", "bad]name", "--volume", "vol0",
                          "--lab", str(lab.dir)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("opie: ")
    assert conf.read_bytes() == before
    api.call("DELETE", "/v1/shares/s06ro")
    api.call("DELETE", "/v1/snapshots/vol0/s06")
    os.unlink(lab.dir / "mnt" / "vol0" / "s06big")
