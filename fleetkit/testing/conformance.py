"""The storage conformance suite: one set of tests that every storage backend must pass.

A backend package runs the suite against a real server in three steps:

1. subclass `StoreHarness`, which starts, kills, pauses and restarts the
   backend's server and builds clients of it;
2. define a pytest fixture named ``harness`` that yields a started harness
   and stops it afterwards (`started_harness` does both);
3. subclass `StorageConformance` in a test module.

A test that a backend cannot pass because of a limit it documents is
overridden in that subclass with a method that calls ``pytest.skip(reason)``.
docs/storage-conformance.md walks through an example.
"""

from __future__ import annotations

import abc
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest

# Registered before the imports below, so that a failing assert in the suite
# shows its operands as it would in a test module.
pytest.register_assert_rewrite(*(f"fleetkit.testing.conformance_{part}"
                                 for part in ("election", "faults", "keys", "leases", "support", "watch")))

from fleetkit.core.config import StorageConfig  # noqa: E402
from fleetkit.core.plugins import STORAGE, load_driver  # noqa: E402
from fleetkit.core.storage import Storage  # noqa: E402
from fleetkit.testing import logscan  # noqa: E402
from fleetkit.testing.conformance_election import ElectionTests  # noqa: E402
from fleetkit.testing.conformance_faults import FaultTests  # noqa: E402
from fleetkit.testing.conformance_keys import KeyTests  # noqa: E402
from fleetkit.testing.conformance_leases import LeaseTests  # noqa: E402
from fleetkit.testing.conformance_support import unique_prefix  # noqa: E402
from fleetkit.testing.conformance_watch import WatchTests  # noqa: E402

__all__ = ["StorageConformance", "StoreHarness", "started_harness", "unique_prefix"]


class StoreHarness(abc.ABC):
    """A real store server started by a test, and clients to it.

    `backend` is the entry-point name of the driver under test. `durable`
    is True when acknowledged writes survive `kill()` followed by
    `restart()`; the crash test is skipped for stores that declare False.
    Every method that touches the server process signals only the process
    this harness started, and returns within a few seconds or raises.
    """

    backend: ClassVar[str]
    durable: ClassVar[bool]

    def __init__(self, directory: Path):
        """Own `directory`, a short empty temporary directory, for data, sockets and logs."""
        self.directory = Path(directory)

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the server and return once it accepts requests (a no-op for embedded stores)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop everything this harness started, by process id; safe to call twice or after kill()."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would; an embedded store is abandoned unclosed."""

    @abc.abstractmethod
    async def restart(self) -> None:
        """After kill(), start the server again on the same address and data, and wait until it accepts requests."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Freeze the server with SIGSTOP: connections stay open, requests receive no response.

        Returns once the process is stopped, not merely signalled. A store
        without a server process may call ``pytest.skip``.
        """

    @abc.abstractmethod
    async def resume(self) -> None:
        """Continue a paused server with SIGCONT."""

    @abc.abstractmethod
    def storage_config(self, prefix: str) -> StorageConfig:
        """Return the ``[storage]`` section of a client of this store under `prefix`.

        The config must be JSON-serializable with `dataclasses.asdict`, because
        the paused-leader test hands it to a subprocess.
        """

    async def new_storage(self, prefix: str) -> Storage:
        """Return a connected client: the driver loaded by its entry point, built from `storage_config(prefix)`."""
        driver = load_driver(STORAGE, self.backend)
        storage = driver.from_config(self.storage_config(prefix))
        await storage.connect()
        return storage

    @abc.abstractmethod
    async def lose_history(self, storage: Storage) -> int:
        """Make the store discard its change history up to now and return the current revision.

        Afterwards, a watch from any earlier revision must raise CompactedError.
        `storage` is a connected client the harness may use for the purpose.
        """


@contextlib.asynccontextmanager
async def started_harness(harness_class: type[StoreHarness]) -> AsyncIterator[StoreHarness]:
    """Start a `harness_class` in a fresh short temporary directory; stop it and remove the directory on exit.

    The directory lives directly under the system temp directory because unix
    socket paths are limited to about 100 bytes.
    """
    directory = Path(tempfile.mkdtemp(prefix="fkconf-"))
    harness = harness_class(directory)
    try:
        await harness.start()
        yield harness
    finally:
        try:
            await harness.stop()
        finally:
            # Private keys the harness made must not show up in any log of the test run.
            logscan.register_key_files(directory)
            shutil.rmtree(directory, ignore_errors=True)


class StorageConformance(KeyTests, LeaseTests, WatchTests, FaultTests, ElectionTests):
    """Every storage conformance test; needs a fixture named ``harness`` yielding a started `StoreHarness`.

    Subclass it in a module whose name pytest collects, with a class name
    starting with ``Test``. Timing knobs are described in `ConformanceBase`.
    """
