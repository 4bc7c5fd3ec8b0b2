"""Unit files that fleetkit places in a systemd unit directory.

Each file fleetkit writes starts with a marker line, ``# fleetkit: hash=<hash>``,
followed by the unit file content. The marker separates fleetkit's files from
any others in the directory and records the content hash that the engine
scheduled. Writes go to a hidden temporary file in the same directory and are
renamed into place, so systemd never reads half a file.

These functions block on file I/O; the runtime runs them in a worker thread.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from fleetkit.core.errors import RuntimeBackendError, UnitError

logger = logging.getLogger(__name__)

MARKER_PREFIX = "# fleetkit: hash="
# The suffixes systemd loads units from; a name without one is not a unit.
_UNIT_NAME = re.compile(
    r"^[A-Za-z0-9:_.\\@-]+\.(service|socket|target|device|mount|automount|swap|timer|path|slice|scope)$"
)
_MAX_UNIT_NAME = 255


def check_unit_name(name: str) -> None:
    """Raise `UnitError` unless `name` is a valid unit file name (``foo.service``, ``a@b.timer``)."""
    if len(name) > _MAX_UNIT_NAME or not _UNIT_NAME.match(name) or name.startswith("."):
        raise UnitError(
            f"invalid unit name {name!r}: expected letters, digits or ':_.\\@-', a known suffix such as "
            f".service, and at most {_MAX_UNIT_NAME} characters"
        )


def _check_hash(name: str, content_hash: str) -> None:
    if not content_hash or any(char.isspace() for char in content_hash):
        raise UnitError(f"invalid content hash {content_hash!r} for unit {name}: it must be non-empty without whitespace")


def read_marker(path: Path) -> str | None:
    """Return the hash in the marker line of `path`, or None if it is not a fleetkit file."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            first = handle.readline(512)
    except (FileNotFoundError, IsADirectoryError):
        return None
    if not first.startswith(MARKER_PREFIX):
        return None
    value = first[len(MARKER_PREFIX) :].strip()
    return value or None


def scan(directory: str) -> dict[str, str]:
    """Return name to hash for every fleetkit unit file in `directory` (empty if it does not exist)."""
    found: dict[str, str] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    for entry in entries:
        # Symlinks and hidden temporary files are never ours.
        if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
            continue
        content_hash = read_marker(Path(entry.path))
        if content_hash is not None:
            found[entry.name] = content_hash
    return found


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_units(directory: str, files: Mapping[str, tuple[str, str]]) -> None:
    """Write every unit file atomically into `directory`, creating it if needed.

    Checks all names and hashes, and that no target is a file fleetkit did not
    write, before writing anything. Raises `UnitError` for a bad name or hash
    and `RuntimeBackendError` when a foreign file is in the way or I/O fails.
    """
    target = Path(directory)
    for name, (_content, content_hash) in files.items():
        check_unit_name(name)
        _check_hash(name, content_hash)
        existing = target / name
        if existing.is_symlink() or (existing.exists() and read_marker(existing) is None):
            raise RuntimeBackendError(
                f"{existing} exists and was not written by fleetkit; refusing to overwrite it. "
                "Remove or rename that file, or rename the fleetkit unit"
            )

    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, (content, content_hash) in files.items():
            _write_atomically(target, name, f"{MARKER_PREFIX}{content_hash}\n{content}")
        if files:
            _fsync_directory(target)
    except OSError as exc:
        raise RuntimeBackendError(f"writing unit files into {directory} failed: {exc}; check the directory's permissions and free space") from exc


def _write_atomically(directory: Path, name: str, text: str) -> None:
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, directory / name)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def remove_units(directory: str, names: Iterable[str]) -> list[str]:
    """Remove the named fleetkit unit files from `directory` and return the names removed.

    Names without a file are skipped; files without the marker are left in
    place with a warning, because fleetkit did not write them.
    """
    removed = []
    target = Path(directory)
    for name in names:
        check_unit_name(name)
        path = target / name
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_symlink() or read_marker(path) is None:
            logger.warning("not removing %s: it was not written by fleetkit", path)
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise RuntimeBackendError(f"removing unit file {path} failed: {exc}; check the directory's permissions") from exc
        removed.append(name)
    return removed
