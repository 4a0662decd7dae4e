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
    """A cluster CA and a host certificate directory signed by it."""
    from nbd import tls
    ca = tmp_path_factory.mktemp("ca")
    tls.create_ca(ca)
    host = tmp_path_factory.mktemp("tls")
    tls.issue(ca, host, client_name="opie-test-head")
    return {"ca": str(ca), "dir": str(host)}


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
