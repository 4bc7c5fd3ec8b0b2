"""Creating the embedded store's file, and the lock that admits one process to it.

The lock is an exclusive `flock` on ``<path>.lock``, which contains the pid of
the process that owns the store. The kernel drops the lock when that process
exits, even when it crashes, so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os

from fleetkit.core.errors import StorageError


def create_file(path: str) -> None:
    """Create `path` (mode 0600) and its missing parent directories (mode 0700).

    Raises `StorageError` naming the path when it cannot be created.
    """
    parent = os.path.dirname(path) or "."
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        if os.path.exists(path):
            return
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        directory = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)  # make the new directory entry durable
        finally:
            os.close(directory)
    except OSError as error:
        raise StorageError(
            f"cannot create the embedded store at {path} ({error.strerror or error}); "
            "set [storage] path, or node.state_dir, to a writable directory"
        ) from error


class StoreLock:
    """The exclusive lock of the store at `path`, held from `acquire` to `release`."""

    def __init__(self, path: str):
        self.path = path
        self.lock_path = path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write this process's pid into the lock file.

        Raises `StorageError` naming the process that holds the lock.
        """
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise StorageError(f"cannot open the lock file {self.lock_path} ({error.strerror or error}); "
                               "check the permissions of its directory") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StorageError(
                f"embedded store at {self.path} is in use by process {holder} (lock file {self.lock_path}); "
                "stop the other fleetkit daemon, or switch [storage] backend to a networked store such as "
                "etcd3 so that several daemons can share it"
            ) from error
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Clear the pid and drop the lock; does nothing when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the lock goes away with the descriptor anyway
        os.close(fd)
