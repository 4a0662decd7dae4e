"""Share definitions, validation, renderers (golden files), config file and CLI.

Pure tests: no server runs here. Golden files live in tests/golden/shares;
set OPIE_UPDATE_GOLDEN=1 to rewrite them after a deliberate change.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from opie.cli.main import main as opie
from opie.shares import nfs, smb
from opie.shares.acl import entries, revocations
from opie.shares.clients import describe, how_to_connect
from opie.shares.errors import ValidationErrors
from opie.shares.model import Protocol, Share, ShareTable
from opie.shares.smbd import write_config
from opie.shares.store import load_table, save_table

GOLDEN = Path(__file__).parent / "golden" / "shares"

VOLUMES = {"vol1": "/srv/opie/vol1", "vol2": "/srv/opie/vol2"}


def lab_table() -> ShareTable:
    table = ShareTable(VOLUMES)
    for share in (
        Share("docs", "vol1", "docs", Protocol.BOTH, users=("alice", "bob"), groups=("staff",),
              networks=("192.168.10.0/24", "10.1.2.3"), previous_versions=True,
              comment="Team documents"),
        Share("media", "vol2", "", Protocol.SMB, read_only=True, guest_ok=True),
        Share("backup", "vol2", "backup/nightly", Protocol.NFS, read_only=True,
              networks=("10.0.0.0/8",), root_squash=False),
    ):
        table = table.with_share(share)
    return table.validate()


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("OPIE_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the golden file"


def test_smb_conf_matches_golden_and_testparm_accepts_it(tmp_path: Path) -> None:
    settings = smb.SmbSettings(state_dir="/var/lib/opie/shares/smb", port=4450,
                               bind_address="192.168.10.5").validate()
    text = smb.render(lab_table(), settings)
    check_golden("smb.conf", text)
    # The same table with a real state dir must pass Samba's own checker.
    local = smb.SmbSettings(state_dir=str(tmp_path / "smb"), port=4450)
    conf = write_config(local, lab_table())
    done = subprocess.run(["testparm", "-s", "--suppress-prompt", str(conf)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Unknown parameter" not in done.stderr and "Ignoring" not in done.stderr


def test_ganesha_conf_matches_golden() -> None:
    settings = nfs.NfsSettings(state_dir="/var/lib/opie/shares/nfs", port=20490,
                               bind_address="192.168.10.5", versions=(3, 4)).validate()
    check_golden("ganesha.conf", nfs.render(lab_table(), settings))


def test_render_is_pure_and_ordered() -> None:
    table = lab_table()
    settings = smb.SmbSettings(state_dir="/x")
    reversed_table = ShareTable(table.volumes, tuple(reversed(table.shares)))
    assert smb.render(table, settings) == smb.render(reversed_table, settings)
    nsettings = nfs.NfsSettings(state_dir="/x")
    assert nfs.render(table, nsettings) == nfs.render(reversed_table, nsettings)
    # SMB-only shares never reach ganesha.conf, NFS-only never smb.conf.
    assert "/srv/opie/vol2\n" not in nfs.render(table, nsettings)
    assert "[backup]" not in smb.render(table, settings)


BAD_SHARES = [
    ("name", dict(name="bad]name")),
    ("name", dict(name="a\nb")),
    ("name", dict(name="global")),
    ("name", dict(name="x=y")),
    ("name", dict(name="semi;colon")),
    ("name", dict(name="hash#")),
    ("name", dict(name='quo"te')),
    ("name", dict(name="")),
    ("path", dict(path="../etc")),
    ("path", dict(path="docs/../../etc")),
    ("path", dict(path="/etc")),
    ("path", dict(path="docs\n[evil]")),
    ("path", dict(path='do"cs')),
    ("path", dict(path="do{cs}")),
    ("path", dict(path="%U")),
    ("volume", dict(volume="nope")),
    ("users", dict(users=("root;x",))),
    ("users", dict(users=("Alice",))),
    ("users", dict(users=("a b",))),
    ("users", dict(users=("@staff",))),
    ("groups", dict(groups=("st=aff",))),
    ("networks", dict(protocol=Protocol.NFS, networks=("10.0.0.0/33",))),
    ("networks", dict(protocol=Protocol.NFS, networks=("10.0.0.0/8; evil",))),
    ("networks", dict(protocol=Protocol.NFS, networks=())),
    ("networks", dict(networks=("10.0.0.0/8",))),
    ("users", dict(protocol=Protocol.NFS, networks=("10.0.0.0/8",), users=("alice",))),
    ("export_id", dict(protocol=Protocol.NFS, networks=("10.0.0.0/8",), export_id=70000)),
    ("comment", dict(comment="evil\n[x]")),
]


@pytest.mark.parametrize("field,changes", BAD_SHARES, ids=[repr(c) for _, c in BAD_SHARES])
def test_bad_share_is_rejected_by_field(field: str, changes: dict) -> None:
    base = dict(name="docs", volume="vol1", path="docs")
    share = Share(**{**base, **changes})
    table = lab_table().without_share("docs")
    with pytest.raises(ValidationErrors) as info:
        table.with_share(share).validate()
    assert any(f.endswith("." + field) for f in info.value.fields()), str(info.value)
    assert str(info.value)  # readable one-liner for the admin


def test_symlink_escaping_the_volume_is_rejected(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "inside").mkdir()
    (volume / "link").symlink_to("/etc")
    table = ShareTable({"v": str(volume)})
    table.with_share(Share("ok", "v", "inside")).validate()
    with pytest.raises(ValidationErrors) as info:
        table.with_share(Share("bad", "v", "link")).validate()
    assert "outside volume" in str(info.value)


def test_bad_volume_mountpoint_and_duplicates_are_rejected() -> None:
    with pytest.raises(ValidationErrors) as info:
        ShareTable({"v": "/srv/a b\n[x]"}, (Share("s", "v"),)).validate()
    assert "volumes.v" in info.value.fields()
    table = ShareTable(VOLUMES, (Share("docs", "vol1"), Share("DOCS", "vol2")))
    with pytest.raises(ValidationErrors) as info:
        table.validate()
    assert "duplicates" in str(info.value)


def test_export_ids_are_assigned_and_kept() -> None:
    table = lab_table()
    ids = {s.name: s.export_id for s in table.shares if s.nfs}
    assert ids == {"docs": 1, "backup": 2}
    # Re-adding a changed share keeps its id; a new share gets the lowest free one.
    changed = table.with_share(Share("docs", "vol1", "docs2", Protocol.NFS,
                                     networks=("10.0.0.0/8",)))
    assert changed.get("docs").export_id == 1
    freed = table.without_share("docs").with_share(
        Share("new", "vol1", "n", Protocol.NFS, networks=("10.0.0.0/8",)))
    assert freed.get("new").export_id == 1


def test_config_file_round_trip_json_and_yaml(tmp_path: Path) -> None:
    table = lab_table()
    for name in ("shares.json", "shares.yaml"):
        save_table(tmp_path / name, table)
        assert load_table(tmp_path / name) == table
    (tmp_path / "broken.json").write_text('{"shares": [{"name": 5}]}')
    with pytest.raises(ValidationErrors) as info:
        load_table(tmp_path / "broken.json")
    assert "shares[0].name" in info.value.fields()


def test_cli_share_add_list_del(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(tmp_path / "shares.json")
    vol = tmp_path / "vol"
    vol.mkdir()
    assert opie(["share", "add", "docs", "--volume", "v", "--mountpoint", str(vol),
                 "--path", "docs", "--user", "alice", "--config", config]) == 0
    assert opie(["share", "add", "exp", "--volume", "v", "--protocol", "nfs",
                 "--network", "127.0.0.1/32", "--read-only", "--config", config]) == 0
    capsys.readouterr()
    assert opie(["share", "list", "--json", "--config", config]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listed["shares"]] == ["docs", "exp"]
    assert listed["shares"][1]["export_id"] == 1
    assert opie(["share", "list", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "docs" in out and f"{vol}/docs" in out and "127.0.0.1/32" in out
    before = Path(config).read_bytes()
    # Bad input: exit code 2, one clear line, file untouched.
    for bad in (["share", "add", "x]y", "--volume", "v"],
                ["share", "add", "up", "--volume", "v", "--path", "../../etc"],
                ["share", "add", "u2", "--volume", "v", "--user", "bob;rm"],
                ["share", "add", "docs", "--volume", "v"],
                ["share", "del", "nope"]):
        assert opie(bad + ["--config", config]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("opie: ") and err.count("\n") == 1, err
        assert Path(config).read_bytes() == before
    assert opie(["share", "del", "docs", "--config", config]) == 0
    assert [s.name for s in load_table(Path(config)).shares] == ["exp"]


def test_lab_description_urls_and_connect_lines() -> None:
    entries = describe(lab_table(), "10.0.0.5", 4450, 20490, "labuser", "pw")
    assert [(e["name"], e["protocol"]) for e in entries] == [
        ("backup", "nfs"), ("docs", "smb"), ("docs", "nfs"), ("media", "smb")]
    assert entries[1]["url"] == "smb://10.0.0.5:4450/docs" and entries[1]["user"] == "labuser"
    assert entries[2]["url"] == "nfs://10.0.0.5:20490/docs" and entries[2]["user"] is None
    assert how_to_connect(entries[1]) == "smbclient //10.0.0.5/docs -p 4450 -U labuser%pw"
    assert how_to_connect(entries[2]) == "nfs-ls 'nfs://10.0.0.5/docs?version=4&nfsport=20490'"


def test_acl_revocations_per_directory() -> None:
    old = ShareTable(VOLUMES, (Share("a", "vol1", "x", users=("alice",), groups=("staff",)),
                               Share("b", "vol1", "x", users=("bob",)),
                               Share("c", "vol1", "y", users=("carol",))))
    new = ShareTable(VOLUMES, (Share("b", "vol1", "x", users=("bob",)),
                               Share("c", "vol1", "z", users=("carol",))))
    assert revocations(old, new) == {
        Path("/srv/opie/vol1/x"): {("u", "alice"), ("g", "staff")},
        Path("/srv/opie/vol1/y"): {("u", "carol")},  # c moved from y to z
    }
    assert entries(Share("r", "vol1", read_only=True, users=("bob",))) == \
        ["u:bob:r-x", "d:u:bob:r-x"]


@pytest.mark.parametrize("extra, field", [
    (["docs2\n"], "name"),
    (["docs2", "--user", "alice\n"], "users"),
    (["docs2", "--comment", "notes\n"], "comment"),
    (["docs2", "--volume", "v3", "--mountpoint", "/srv/v3\n"], "volumes.v3"),
])
def test_cli_share_add_refuses_a_trailing_newline(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  extra: list[str], field: str) -> None:
    """`re.match` with `$` accepted 'docs2\\n': refused now, by field; smb.conf byte-identical."""
    config = str(tmp_path / "shares.json")
    vol = tmp_path / "vol"
    vol.mkdir()
    assert opie(["share", "add", "docs", "--volume", "v", "--mountpoint", str(vol),
                 "--config", config]) == 0
    settings = smb.SmbSettings(state_dir=str(tmp_path / "smb"), port=4450)
    conf = write_config(settings, load_table(Path(config))).read_bytes()
    before = Path(config).read_bytes()
    capsys.readouterr()
    args = ["share", "add", *extra, "--config", config]
    if "--volume" not in extra:
        args += ["--volume", "v"]
    assert opie(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("opie: ") and f"{field}: " in err and err.count("\n") == 1, err
    assert Path(config).read_bytes() == before
    assert write_config(settings, load_table(Path(config))).read_bytes() == conf


def test_the_resolved_directory_is_rendered(tmp_path: Path) -> None:
    """A share reached through a symlink inside its volume is rendered as the real directory,
    so swapping that symlink later cannot move what smbd serves."""
    vol = tmp_path / "vol"
    (vol / "real" / "docs").mkdir(parents=True)
    (vol / "link").symlink_to("real")
    table = ShareTable({"v": str(vol)}).with_share(Share("docs", "v", "link/docs")).validate()
    settings = smb.SmbSettings(state_dir=str(tmp_path / "smb"), port=4450)
    text = write_config(settings, table).read_text()
    assert f"\tpath = {vol}/real/docs\n" in text
    assert "link" not in text
