"""The shared mechanisms in opie/: atomic file replacement, the full pwrite
loop and the HOST:PORT parser (one of each, used by every package)."""
from __future__ import annotations

import os
import stat
import threading

import pytest

from opie import fileio
from opie.head import config as head_config
from opie.netaddr import parse_host_port


def test_atomic_write_replaces_and_fsyncs_file_and_directory(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "state.json"
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    fileio.atomic_write(target, "one\n")
    fileio.atomic_write(target, b"two\n", mode=0o600)
    assert target.read_bytes() == b"two\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert synced == ["file", "dir", "file", "dir"]  # the rename itself is made durable
    assert os.listdir(target.parent) == ["state.json"]


def test_atomic_write_failure_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        fileio.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_concurrent_writers_never_share_a_temporary(tmp_path):
    """head/config.py used a fixed temp name: two savers could rename each other's half file."""
    target = tmp_path / "head.json"
    texts = [f"{i}\n" * 50_000 for i in range(8)]
    errors: list[BaseException] = []

    def writer(text: str) -> None:
        try:
            for _ in range(5):
                fileio.atomic_write(target, text)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert target.read_text() in texts
    assert os.listdir(tmp_path) == ["head.json"]


def test_head_config_save_goes_through_the_atomic_write(tmp_path, monkeypatch):
    cfg = head_config.HeadConfig(name="h1", members=["nbd://127.0.0.1:1/a", "nbd://127.0.0.1:1/b"], tls_dir=None, mount_root=str(tmp_path))
    calls = []
    real = fileio.atomic_write
    monkeypatch.setattr(head_config, "atomic_write", lambda p, d, **kw: (calls.append(p), real(p, d, **kw)))
    head_config.save(tmp_path, cfg)
    assert calls == [tmp_path / head_config.FILENAME]
    assert head_config.load(tmp_path).name == "h1"


def test_pwrite_all_survives_short_writes(tmp_path, monkeypatch):
    path = tmp_path / "disk"
    path.write_bytes(b"\0" * 64)
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real(fd, bytes(data[:3]), off))
    fd = os.open(path, os.O_RDWR)
    try:
        fileio.pwrite_all(fd, b"0123456789abcdef", 10)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 10 + b"0123456789abcdef" + b"\0" * 38


def test_pwrite_all_reports_no_progress_as_eio(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: 0)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError) as err:
            fileio.pwrite_all(fd, b"x", 0)
    finally:
        os.close(fd)
    assert err.value.errno == 5


@pytest.mark.parametrize("text, kw, expected", [
    ("127.0.0.1:10809", {}, ("127.0.0.1", 10809)),
    ("[::1]:80", {}, ("::1", 80)),
    ("host.example:1", {}, ("host.example", 1)),
    (":0", {"default_host": "0.0.0.0", "allow_port_zero": True}, ("0.0.0.0", 0)),
])
def test_parse_host_port_accepts(text, kw, expected):
    assert parse_host_port(text, **kw) == expected


@pytest.mark.parametrize("text, kw", [
    ("127.0.0.1", {}), ("127.0.0.1:", {}), ("127.0.0.1:x", {}), ("127.0.0.1:-1", {}),
    ("127.0.0.1:65536", {}), ("127.0.0.1:0", {}), (":80", {}), ("a b:80", {}),
    ("127.0.0.1:８０", {}), (None, {}),
])
def test_parse_host_port_refuses(text, kw):
    with pytest.raises(ValueError):
        parse_host_port(text, **kw)


def test_head_config_refuses_a_bad_listen_address(tmp_path):
    with pytest.raises(head_config.ConfigError, match="api_listen"):
        head_config.HeadConfig(name="h1", members=["nbd://127.0.0.1:1/a", "nbd://127.0.0.1:1/b"], tls_dir=None, mount_root=str(tmp_path),
                               api_listen="localhost").validate()
