"""No test secret in any log: runs last and scans what the whole test run archived.

Test clusters archive their daemons' logs and the command-line client's
output, and register the store passwords and private keys they were given
(`fleetkit.testing.logscan`). Warnings logged by the test process itself
are archived too. This file's name puts it after every other test file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetkit.testing import logscan


def test_logs_contain_no_secret():
    archive = logscan.archive_dir()
    if archive is None or logscan.logs_archived(archive) < 2:
        pytest.skip("no daemon logs were archived; run the whole suite")

    findings = logscan.scan(archive)

    assert findings == [], "\n".join(f"{item.file}:{item.line}: {item.what}" for item in findings)


def test_logscan_finds_planted_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv(logscan.ARCHIVE_ENV, str(tmp_path))
    (tmp_path / "logs").mkdir()
    logscan.register_secret("hunter2-planted")
    logscan.archive_text("INFO connected\nERROR password hunter2-planted rejected\n", "planted")
    logscan.archive_text("-----BEGIN EC PRIVATE KEY-----\n", "planted")
    keys = tmp_path / "keys"
    keys.mkdir()
    body = "MHcCAQEEIBvQ7l0g2Yc5wq8Jm3f4ZQ0aXcR1bN9kP2sT6uV8wY0zoAoGCCqGSM49"
    (keys / "n1-key.pem").write_text(f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n")
    logscan.register_key_files(keys)
    logscan.archive_text(f"debug dump {body}\n", "other")

    findings = logscan.scan(Path(tmp_path))

    assert [(item.file, item.line) for item in findings] == [
        ("other.log", 1), ("planted.log", 2), ("planted.log", 3),
    ]
    assert all("hunter2-planted" not in item.what for item in findings)
