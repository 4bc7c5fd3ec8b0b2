"""fleetkit tls: a cluster CA, certificates with roles and SANs, and inspection."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from fleetkit.testing.certificates import expired_certificate


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleetkit", *args], capture_output=True, text=True, timeout=60)


def test_init_ca_writes_private_key(tmp_path):
    result = run("tls", "init-ca", "--dir", str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    assert (tmp_path / "ca.pem").exists()


def test_init_ca_refuses_overwrite(tmp_path):
    assert run("tls", "init-ca", "--dir", str(tmp_path)).returncode == 0
    before = (tmp_path / "ca-key.pem").read_bytes()

    again = run("tls", "init-ca", "--dir", str(tmp_path))

    assert again.returncode == 1
    assert "--force" in again.stderr
    assert (tmp_path / "ca-key.pem").read_bytes() == before


def test_issue_signs_with_role_and_sans(tmp_path):
    assert run("tls", "init-ca", "--dir", str(tmp_path)).returncode == 0

    result = run("tls", "issue", "--ca-dir", str(tmp_path), "--name", "node1", "--role", "node",
                 "--ip", "127.0.0.1", "--dns", "node1.cluster")
    shown = run("--output", "json", "tls", "show", str(tmp_path / "node1.pem"))

    assert result.returncode == 0, result.stderr
    certificate = x509.load_pem_x509_certificate((tmp_path / "node1.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    certificate.verify_directly_issued_by(ca)
    assert stat.S_IMODE((tmp_path / "node1-key.pem").stat().st_mode) == 0o600
    info = json.loads(shown.stdout)
    assert info["role"] == "node"
    assert info["ip"] == ["127.0.0.1"]
    assert info["dns"] == ["node1.cluster"]
    assert info["days_left"] > 360


def test_issue_rejects_bad_input(tmp_path):
    missing_ca = run("tls", "issue", "--ca-dir", str(tmp_path), "--name", "a", "--role", "admin")
    assert run("tls", "init-ca", "--dir", str(tmp_path)).returncode == 0
    bad_ip = run("tls", "issue", "--ca-dir", str(tmp_path), "--name", "b", "--role", "node", "--ip", "10.0.0.300")
    no_san = run("tls", "issue", "--ca-dir", str(tmp_path), "--name", "c", "--role", "node")
    bad_role = run("tls", "issue", "--ca-dir", str(tmp_path), "--name", "d", "--role", "root")

    assert missing_ca.returncode == 1
    assert "init-ca" in missing_ca.stderr
    assert bad_ip.returncode == 1
    assert "10.0.0.300" in bad_ip.stderr
    assert no_san.returncode == 1
    assert "--ip" in no_san.stderr
    assert bad_role.returncode == 2
    assert "root" in bad_role.stderr
    assert not (tmp_path / "b.pem").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    (["--name", "x", "--role", "admin", "--days", "0"], "--days 0 is invalid; a certificate must be valid for at least 1 day"),
    (["--name", "", "--role", "admin"], "--name '' is invalid; it also names the files"),
    (["--name", "../escaped", "--role", "admin"], "--name '../escaped' is invalid"),
    (["--name", "n", "--role", "node", "--ip", "0.0.0.0"], "--ip 0.0.0.0 is invalid: an unspecified address is never dialled"),
    (["--name", "n", "--role", "node", "--dns", "not a dns!"], "--dns 'not a dns!' is not a DNS name"),
])
def test_issue_rejects_invalid_values(tmp_path, arguments, message):
    assert run("tls", "init-ca", "--dir", str(tmp_path)).returncode == 0

    result = run("tls", "issue", "--ca-dir", str(tmp_path), "--out", str(tmp_path / "out"), *arguments)

    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "escaped.pem").exists()


def test_show_reports_expired(tmp_path):
    assert run("tls", "init-ca", "--dir", str(tmp_path)).returncode == 0
    expired_certificate(tmp_path, tmp_path, "old")

    shown = run("tls", "show", str(tmp_path / "old.pem"))

    assert shown.returncode == 1
    assert "expired" in shown.stdout
    assert "role:      admin" in shown.stdout
