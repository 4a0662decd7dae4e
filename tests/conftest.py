"""Shared fixtures. Every process a fixture starts is stopped by its pid in
teardown, whether the test passed or not."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from proc_support import start_isu, start_nbdkit, stop  # noqa: E402


@pytest.fixture(scope="session")
def cluster_tls(tmp_path_factory):
    """A cluster CA and certificate directories signed by it: `dir` of role
    head (a head's, also used for ISUs where roles do not matter), `isu` of
    role isu (an ISU's)."""
    from opie.nbd import tls
    ca = tmp_path_factory.mktemp("ca")
    tls.create_ca(ca)
    head = tmp_path_factory.mktemp("tls")
    tls.issue(ca, head, client_name="opie-test-head", role="head")
    isu = tmp_path_factory.mktemp("tls-isu")
    tls.issue(ca, isu, client_name="opie-test-isu", role="isu")
    return {"ca": str(ca), "dir": str(head), "isu": str(isu)}


@pytest.fixture
def isu_factory(tmp_path):
    """start(disks, **kw) -> ISUProcess; all stopped at teardown."""
    procs = []

    def start(disks, name="isu", **kw):
        p = start_isu(str(tmp_path / name), disks, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        stop(p.proc)


@pytest.fixture
def nbdkit_factory():
    procs = []

    def start(image, **kw):
        proc, port = start_nbdkit(image, **kw)
        procs.append(proc)
        return port

    yield start
    for p in procs:
        stop(p)


@pytest.fixture(scope="session")
def head_lab(tmp_path_factory):
    """One lab for the head scenarios: 5 ISUs of 256 MiB, a head with vol0
    mounted. Scenarios that break something put it back (restart what they
    killed) before they end; the fixture checks the array is whole again."""
    from opie.head.apiclient import HeadAPI
    from opie.lab.runner import Lab
    import pathlib
    import shutil
    import tempfile
    # share users reach the volume as themselves: every parent must be
    # traversable, which pytest's 0700 tmp dirs are not
    d = pathlib.Path(tempfile.mkdtemp(prefix="opie-headlab-", dir="/var/tmp"))
    d.chmod(0o755)
    lab = Lab(d, isus=5, disk_size="256M")
    try:
        lab.up()
        yield lab, HeadAPI.locate(lab_dir=str(d))
    finally:
        lab.down()
        from opie.head.mount import cleanup_stale
        cleanup_stale(str(d / "head" / "run"), str(d / "mnt"))
        lab.remove_user()
        if not any(str(d) in line for line in open("/proc/mounts")):
            shutil.rmtree(d, ignore_errors=True)
