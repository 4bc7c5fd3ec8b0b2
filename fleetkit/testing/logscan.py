"""Log archive of a whole test run, and the check that no test secret appears in it.

Tests register the secrets they hand to daemons and stores (passwords, and
the private keys they issue) with `register_secret` and `register_key_files`,
and keep what daemons and the command-line client wrote with `archive_file`
and `archive_text`. All of it goes to the directory named by the
environment variable `ARCHIVE_ENV`, which the test session sets; without it
these functions do nothing. `scan` then reports every line of the archived
logs that contains a registered secret or a PEM private key.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

ARCHIVE_ENV = "FLEETKIT_TEST_LOG_ARCHIVE"
# Shorter strings would match by chance; no test secret is this short.
MIN_SECRET_LENGTH = 6
_counter = itertools.count(1)


def archive_dir() -> Path | None:
    """Return the archive directory of this test run, or None outside one."""
    value = os.environ.get(ARCHIVE_ENV, "")
    return Path(value) if value else None


def register_secret(value: str) -> None:
    """Remember `value` as a secret that no log may contain."""
    archive = archive_dir()
    if archive is None or len(value) < MIN_SECRET_LENGTH:
        return
    with open(archive / "secrets.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(value) + "\n")


def register_key_files(directory: Path) -> None:
    """Remember the base64 lines of every private key file (``*-key.pem``) under `directory`."""
    if archive_dir() is None or not directory.exists():
        return
    for path in directory.rglob("*-key.pem"):
        try:
            lines = path.read_text(encoding="ascii", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if not line.startswith("-----") and len(line) >= 40:
                register_secret(line)


def archive_file(path: Path, label: str) -> None:
    """Keep a copy of the log file `path` for the scan at the end of the run."""
    archive = archive_dir()
    if archive is None or not path.exists():
        return
    shutil.copyfile(path, archive / "logs" / f"{next(_counter):05d}-{label}.log")


def archive_text(text: str, label: str) -> None:
    """Keep `text`, such as a command's output, for the scan at the end of the run."""
    archive = archive_dir()
    if archive is None or not text:
        return
    with open(archive / "logs" / f"{label}.log", "a", encoding="utf-8") as handle:
        handle.write(text if text.endswith("\n") else text + "\n")


def prepare(directory: Path) -> None:
    """Create the archive layout in `directory` and point `ARCHIVE_ENV` at it."""
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    os.environ[ARCHIVE_ENV] = str(directory)


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    what: str


def scan(directory: Path) -> list[Finding]:
    """Return every archived log line that contains a registered secret or a private key."""
    secrets_file = directory / "secrets.jsonl"
    secrets = set()
    if secrets_file.exists():
        secrets = {json.loads(line) for line in secrets_file.read_text(encoding="utf-8").splitlines() if line}
    findings = []
    for path in sorted((directory / "logs").glob("*.log")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if "PRIVATE KEY-----" in line:
                findings.append(Finding(path.name, number, "a PEM private key"))
            for secret in secrets:
                if secret in line:
                    findings.append(Finding(path.name, number, f"the secret {secret[:2]}... ({len(secret)} characters)"))
    return findings


def logs_archived(directory: Path) -> int:
    """Return how many log files the archive holds."""
    return len(list((directory / "logs").glob("*.log")))
