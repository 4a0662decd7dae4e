"""Certificates carry the role the CA issued them for (subject OU): head,
isu or admin; the default is isu, so acting as a head must be asked for."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from opie.nbd import tls


def role_of(path: Path) -> str | None:
    return tls.cert_role(x509.load_pem_x509_certificate(path.read_bytes()))


def test_roles_are_issued_kept_and_not_silently_replaced(tmp_path: Path) -> None:
    ca = tls.create_ca(tmp_path / "ca")
    default = tls.issue(ca, tmp_path / "isu")
    assert role_of(default / tls.SERVER_CERT) == role_of(default / tls.CLIENT_CERT) == "isu"
    head = tls.issue(ca, tmp_path / "head", role="head")
    before = (head / tls.CLIENT_CERT).read_bytes()
    tls.issue(ca, head, role="head")                       # same role: kept as it is
    assert (head / tls.CLIENT_CERT).read_bytes() == before
    with pytest.raises(FileExistsError, match="issued for role head, not isu"):
        tls.issue(ca, head, role="isu")
    assert (head / tls.CLIENT_CERT).read_bytes() == before
    with pytest.raises(ValueError, match="role"):
        tls.issue(ca, tmp_path / "x", role="boss")


def test_cli_issues_the_asked_role(tmp_path: Path) -> None:
    def opie(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "opie.cli.main", "ca", *args], capture_output=True,
                              text=True, timeout=60)
    assert opie("create", str(tmp_path / "ca")).returncode == 0
    assert role_of(tmp_path / "ca" / tls.CLIENT_CERT) == "admin"
    res = opie("issue", str(tmp_path / "ca"), str(tmp_path / "h"), "--role", "head")
    assert res.returncode == 0, res.stderr
    assert role_of(tmp_path / "h" / tls.CLIENT_CERT) == "head"
    assert opie("issue", str(tmp_path / "ca"), str(tmp_path / "i")).returncode == 0
    assert role_of(tmp_path / "i" / tls.CLIENT_CERT) == "isu"
    assert "--role" in opie("issue", "--help").stdout
