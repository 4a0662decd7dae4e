"""SMB shares against a real smbd, reached with smbclient; users with real accounts.

Each test gets its own smbd (own port on 127.0.0.1, own state dir under
tmp_path) over a volume directory under /tmp that share users can
traverse, and its own Unix users, deleted again in teardown.
"""
from __future__ import annotations

import datetime as dt
import io
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from opie.cli.main import main as opie
from opie.shares.acl import read_acl
from opie.shares.clients import file_sha256 as sha256, scratch_volume, smbclient, smbclient_argv, \
    write_random as random_file
from opie.shares.errors import ValidationErrors
from opie.shares.model import Protocol, Share, ShareTable
from opie.shares.process import free_port, pid_alive
from opie.shares.service import ShareService
from opie.shares.smb import SmbSettings
from opie.shares.smbd import rpc_helper_pids, write_config
from opie.shares.snapshots import snapshot_dir
from opie.shares.users import UserManager

HOST = "127.0.0.1"


@pytest.fixture
def volume() -> Iterator[Path]:
    with scratch_volume() as root:
        yield root


@dataclass
class SmbLab:
    volume: Path
    settings: SmbSettings
    users: UserManager
    service: ShareService
    names: dict[str, str] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)

    def user(self, role: str) -> tuple[str, str]:
        return self.names[role], self.passwords[role]

    def table(self, *shares: Share) -> ShareTable:
        table = ShareTable({"vol": str(self.volume)})
        for share in shares:
            table = table.with_share(share)
        return table

    def client(self, share: str, role: str | None, commands: str,
               password: str | None = None) -> subprocess.CompletedProcess[str]:
        name, pw = self.user(role) if role else (None, None)
        return smbclient(HOST, self.settings.port, share, name, password or pw, commands)


@pytest.fixture
def lab(tmp_path: Path, volume: Path) -> Iterator[SmbLab]:
    settings = SmbSettings(state_dir=str(tmp_path / "smb"), port=free_port())
    write_config(settings, ShareTable())
    users = UserManager(settings.conf_path, tmp_path / "users.json")
    service = ShareService({Protocol.SMB: settings})
    lab = SmbLab(volume, settings, users, service)
    suffix = secrets.token_hex(3)
    try:
        for role in ("alice", "bob"):
            name, password = f"ot{role[0]}{suffix}", secrets.token_urlsafe(12)
            lab.names[role], lab.passwords[role] = name, password  # before add: a half-done add is undone too
            users.add(name, password)
        yield lab
    finally:
        service.stop()
        managed = {u.name for u in users.list()}
        for name in lab.names.values():
            try:
                if name in managed:
                    users.delete(name)
            finally:
                subprocess.run(["userdel", name], capture_output=True)  # if delete failed


def test_put_get_200mib_sha256_equal(lab: SmbLab, tmp_path: Path) -> None:
    alice, _ = lab.user("alice")
    lab.service.start(lab.table(Share("docs", "vol", "docs", users=(alice,))))
    src = random_file(tmp_path / "src.bin", 200 << 20)
    back = tmp_path / "back.bin"
    done = lab.client("docs", "alice", f"put {src} big.bin; get big.bin {back}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sha256(src) == sha256(lab.volume / "docs" / "big.bin") == sha256(back)
    # Files are created as the user, through the ACL the service set.
    assert (lab.volume / "docs" / "big.bin").stat().st_uid == pwd.getpwnam(alice).pw_uid


def test_wrong_password_and_outsider_are_refused(lab: SmbLab) -> None:
    alice, _ = lab.user("alice")
    lab.service.start(lab.table(Share("docs", "vol", "docs", users=(alice,))))
    assert lab.client("docs", "alice", "ls").returncode == 0
    wrong = lab.client("docs", "alice", "ls", password="not-" + lab.passwords["alice"])
    assert wrong.returncode != 0 and "NT_STATUS_LOGON_FAILURE" in wrong.stdout
    outsider = lab.client("docs", "bob", "ls")
    assert outsider.returncode != 0 and "NT_STATUS_ACCESS_DENIED" in outsider.stdout
    guest = lab.client("docs", None, "ls")
    assert guest.returncode != 0


def test_guest_access_only_where_asked_for(lab: SmbLab, tmp_path: Path) -> None:
    alice, _ = lab.user("alice")
    for name in ("open", "closed"):
        (lab.volume / name).mkdir()
        (lab.volume / name / "hi.txt").write_text(f"{name}\n")
    lab.service.start(lab.table(Share("open", "vol", "open", read_only=True, guest_ok=True),
                                Share("closed", "vol", "closed", users=(alice,))))
    got = lab.client("open", None, f"get hi.txt {tmp_path / 'hi.txt'}")
    assert got.returncode == 0 and (tmp_path / "hi.txt").read_text() == "open\n", got.stdout
    refused = lab.client("closed", None, "ls")
    assert refused.returncode != 0 and "NT_STATUS_ACCESS_DENIED" in refused.stdout


def test_read_only_share_refuses_writes(lab: SmbLab, tmp_path: Path) -> None:
    alice, _ = lab.user("alice")
    (lab.volume / "pub").mkdir()
    (lab.volume / "pub" / "readme.txt").write_text("read me\n")
    lab.service.start(lab.table(Share("pub", "vol", "pub", read_only=True, users=(alice,))))
    assert f"user:{alice}:r-x" in read_acl(lab.volume / "pub")
    # Let the file system allow the write, so only smbd's "read only" can refuse it.
    subprocess.run(["setfacl", "-m", f"u:{alice}:rwx", str(lab.volume / "pub")], check=True)
    local = random_file(tmp_path / "f", 10_000)
    put = lab.client("pub", "alice", f"put {local} new.bin")
    assert put.returncode != 0 and "NT_STATUS_ACCESS_DENIED" in put.stdout + put.stderr
    assert not (lab.volume / "pub" / "new.bin").exists()
    rm = lab.client("pub", "alice", "del readme.txt")
    assert "NT_STATUS_ACCESS_DENIED" in rm.stdout  # smbclient's del exits 0 regardless
    assert (lab.volume / "pub" / "readme.txt").exists()
    got = lab.client("pub", "alice", f"get readme.txt {tmp_path / 'r.txt'}")
    assert got.returncode == 0 and (tmp_path / "r.txt").read_text() == "read me\n"


def test_change_applies_while_another_client_stays_connected(lab: SmbLab, tmp_path: Path) -> None:
    alice, _ = lab.user("alice")
    bob, _ = lab.user("bob")
    first = lab.table(Share("docs", "vol", "docs", users=(alice,)))
    lab.service.start(first)
    smbd_pid = lab.service.runners[Protocol.SMB].pid
    one, two = random_file(tmp_path / "one", 5000), random_file(tmp_path / "two", 5000)
    session = subprocess.Popen(
        smbclient_argv(HOST, lab.settings.port, "docs", alice, lab.passwords["alice"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert session.stdin is not None
        session.stdin.write(f"put {one} one\n")
        session.stdin.flush()
        deadline = time.monotonic() + 20
        while not (lab.volume / "docs" / "one").exists():
            assert time.monotonic() < deadline and session.poll() is None, "session never wrote"
            time.sleep(0.05)
        # Change: bob joins docs, a new share appears.
        second = lab.table(Share("docs", "vol", "docs", users=(alice, bob)),
                           Share("team", "vol", "team", users=(bob,)))
        lab.service.apply(second)
        assert lab.service.runners[Protocol.SMB].pid == smbd_pid  # reloaded, not restarted
        assert lab.client("team", "bob", "ls").returncode == 0
        assert lab.client("docs", "bob", "ls").returncode == 0
        assert session.poll() is None, "the connected client was dropped"
        out, _ = session.communicate(f"put {two} two\nexit\n", timeout=30)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    assert session.returncode == 0, out
    assert sha256(lab.volume / "docs" / "two") == sha256(two)
    acl = read_acl(lab.volume / "docs")
    assert f"user:{bob}:rwx" in acl and f"default:user:{bob}:rwx" in acl
    assert f"user:{bob}:rwx" in read_acl(lab.volume / "team")
    # And back: bob is removed from docs, his ACL entries go with him.
    lab.service.apply(lab.table(Share("docs", "vol", "docs", users=(alice,))))
    assert f"user:{bob}:" not in read_acl(lab.volume / "docs")
    refused = lab.client("docs", "bob", "ls")
    assert refused.returncode != 0 and "NT_STATUS_ACCESS_DENIED" in refused.stdout
    # The deleted share "team" took its grants with it.
    assert f"user:{bob}:" not in read_acl(lab.volume / "team")


def test_bad_input_leaves_running_config_unchanged(lab: SmbLab) -> None:
    alice, _ = lab.user("alice")
    good = lab.table(Share("docs", "vol", "docs", users=(alice,)))
    lab.service.start(good)
    before = lab.settings.conf_path.read_bytes()
    (lab.volume / "escape").symlink_to("/etc")
    bad_tables = {
        "name": good.with_share(Share("x]\n[global", "vol", "x")),
        "path": good.with_share(Share("up", "vol", "../../etc")),
        "users": good.with_share(Share("evil", "vol", "e", users=("x\n\tpath = /",))),
        "nouser": good.with_share(Share("ghost", "vol", "g", users=("nosuchuser9",))),
        "symlink": good.with_share(Share("esc", "vol", "escape")),
    }
    for why, table in bad_tables.items():
        with pytest.raises(ValidationErrors) as info:
            lab.service.apply(table)
        assert info.value.errors, why
        assert lab.settings.conf_path.read_bytes() == before, why
        assert lab.service.table == good, why
    assert not (lab.volume / "x").exists() and not (lab.volume / "e").exists()
    assert lab.client("docs", "alice", "ls").returncode == 0


def test_previous_versions_from_gmt_snapshot(lab: SmbLab, tmp_path: Path) -> None:
    alice, _ = lab.user("alice")
    docs = lab.volume / "docs"
    docs.mkdir()
    (docs / "report.txt").write_text("version 1\n")
    # A plain directory tree stands in for a snapshot mounted read-only.
    taken = dt.datetime(2026, 11, 20, 9, 30, 0, tzinfo=dt.timezone.utc)
    snap = snapshot_dir(lab.volume, taken)
    assert snap.name == "@GMT-2026.11.20-09.30.00"
    shutil.copytree(docs, snap / "docs")
    (docs / "report.txt").write_text("version 2, longer\n")
    lab.service.start(lab.table(Share("docs", "vol", "docs", users=(alice,),
                                      previous_versions=True)))
    info = lab.client("docs", "alice", "allinfo report.txt")
    assert info.returncode == 0, info.stdout
    assert "@GMT-2026.11.20-09.30.00" in info.stdout
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    done = lab.client("docs", "alice",
                      f"get @GMT-2026.11.20-09.30.00/report.txt {old}; get report.txt {new}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert old.read_text() == "version 1\n" and new.read_text() == "version 2, longer\n"


def test_stop_ends_smbd_and_its_rpc_helpers(lab: SmbLab) -> None:
    alice, _ = lab.user("alice")
    lab.service.start(lab.table(Share("docs", "vol", "docs", users=(alice,))))
    # Listing shares makes smbd start samba-dcerpcd (srvsvc), which outlives smbd.
    listing = subprocess.run(["smbclient", "-L", HOST, "-p", str(lab.settings.port),
                              "-U", f"{alice}%{lab.passwords['alice']}"],
                             capture_output=True, text=True, timeout=60)
    assert "docs" in listing.stdout, listing.stdout + listing.stderr
    helpers = rpc_helper_pids(lab.settings)
    assert helpers, "samba-dcerpcd was expected to run"
    smbd_pid = lab.service.runners[Protocol.SMB].pid
    lab.service.stop()
    assert smbd_pid is not None and not pid_alive(smbd_pid)
    assert not any(pid_alive(p) for p in helpers)
    assert rpc_helper_pids(lab.settings) == []


def test_users_add_passwd_del_list_and_cli(lab: SmbLab, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    alice, _ = lab.user("alice")
    lab.service.start(lab.table(Share("docs", "vol", "docs", users=(alice,))))
    assert [u.name for u in lab.users.list()] == sorted(lab.names.values())
    assert all(u.in_passdb and u.unix_created for u in lab.users.list())
    lab.users.passwd(alice, "new-secret-1")
    assert lab.client("docs", "alice", "ls").returncode != 0  # old password
    assert lab.client("docs", "alice", "ls", password="new-secret-1").returncode == 0
    for bad in ("root", "daemon", "Bad", "a:b", "x\ny", alice):
        with pytest.raises(ValidationErrors):
            lab.users.add(bad, "pw")
    with pytest.raises(ValidationErrors):
        lab.users.add("otzz" + secrets.token_hex(2), "two\nlines")
    # The CLI, with its own state dir, keeps Unix and passdb in step too.
    state = lab.settings.state_dir.rsplit("/", 1)[0] + "/cli"
    name = "otc" + secrets.token_hex(3)
    try:
        monkeypatch.setattr("sys.stdin", io.StringIO("cli-pass-1\n"))
        assert opie(["user", "add", name, "--password-stdin", "--state-dir", state]) == 0
        assert pwd.getpwnam(name).pw_shell == "/usr/sbin/nologin"
        capsys.readouterr()
        assert opie(["user", "list", "--json", "--state-dir", state]) == 0
        assert '"in_passdb": true' in capsys.readouterr().out
        monkeypatch.setattr("sys.stdin", io.StringIO("cli-pass-2\n"))
        assert opie(["user", "add", "root", "--password-stdin", "--state-dir", state]) == 2
        assert "'root' is reserved" in capsys.readouterr().err
        assert opie(["user", "del", name, "--state-dir", state]) == 0
        with pytest.raises(KeyError):
            pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
    bob, _ = lab.user("bob")
    lab.users.delete(bob)
    with pytest.raises(KeyError):
        pwd.getpwnam(bob)
    assert bob not in [u.name for u in lab.users.list()]
    refused = lab.client("docs", "bob", "ls")
    assert refused.returncode != 0


def test_names_with_a_trailing_newline_leave_smb_conf_unchanged(lab: SmbLab) -> None:
    """A share name or comment ending in a newline is refused by field; the running smb.conf stays byte-identical."""
    alice, _ = lab.user("alice")
    good = lab.table(Share("docs", "vol", "docs", users=(alice,)))
    lab.service.start(good)
    before = lab.settings.conf_path.read_bytes()
    for field, share in (("name", Share("docs2\n", "vol", "d2")),
                         ("comment", Share("docs3", "vol", "d3", comment="notes\n"))):
        with pytest.raises(ValidationErrors) as info:
            lab.service.apply(good.with_share(share))
        assert any(f.endswith("." + field) for f in info.value.fields()), str(info.value)
        assert lab.settings.conf_path.read_bytes() == before, field
        assert lab.service.table == good
    assert not (lab.volume / "d2").exists() and not (lab.volume / "d3").exists()


def test_symlink_swapped_in_after_validation_is_refused_where_smb_conf_is_written(
        lab: SmbLab, tmp_path: Path) -> None:
    """The share's directory becomes a symlink out of the volume after the table was
    validated: smbd's runner refuses the next apply, naming the share; smb.conf is unchanged
    and never names the outside directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    alice, _ = lab.user("alice")
    good = lab.table(Share("docs", "vol", "docs", users=(alice,)))
    lab.service.start(good)
    before = lab.settings.conf_path.read_bytes()
    (lab.volume / "docs").rename(lab.volume / "docs.old")
    (lab.volume / "docs").symlink_to(outside)
    with pytest.raises(ValidationErrors) as info:
        lab.service.runners[Protocol.SMB].apply(good)
    assert "shares.docs.path" in info.value.fields(), str(info.value)
    assert lab.settings.conf_path.read_bytes() == before
    assert str(outside) not in lab.settings.conf_path.read_text()
