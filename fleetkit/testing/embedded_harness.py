"""The conformance harness of the embedded backend: one store file per test.

The embedded store has no server process. `kill()` simulates a crash of
the process that owns the file: the shared database connection is closed and
the file lock dropped, so every client gets `StorageUnavailable` until
`restart()` opens the file again from disk. A real crash (SIGKILL of the
owning process) is tested in tests/test_embedded_storage.py.
"""

from __future__ import annotations

import pytest

from fleetkit.core.config import StorageConfig
from fleetkit.core.storage import Storage
from fleetkit.plugins import embedded_store
from fleetkit.plugins.embedded import EmbeddedStorage
from fleetkit.testing.conformance import StoreHarness

# Seconds; the same bound as the etcd3 harness, generous for a loaded CI machine.
REQUEST_TIMEOUT = 2.0


class EmbeddedHarness(StoreHarness):
    """A store file ``store.db`` in the harness directory, shared by every client the harness builds."""

    backend = "embedded"
    durable = True

    @property
    def path(self) -> str:
        return str(self.directory / "store.db")

    async def start(self) -> None:
        """Nothing to start: the first client creates the file."""

    async def stop(self) -> None:
        """Nothing to stop: the file closes when its last client does."""

    async def kill(self) -> None:
        """Close the shared file and drop its lock; clients stay and see `StorageUnavailable`."""
        store = embedded_store.find(self.path)
        if store is not None:
            await store.call("simulated crash", store.crash_sync)

    async def restart(self) -> None:
        """Open the file again after `kill()`; waiting clients and watches carry on."""
        store = embedded_store.find(self.path)
        if store is not None:
            await store.call("reopen", store.open_sync)

    async def pause(self) -> None:
        pytest.skip("the embedded store has no server process to pause")

    async def resume(self) -> None:
        pytest.skip("the embedded store has no server process to resume")

    def storage_config(self, prefix: str) -> StorageConfig:
        return StorageConfig(backend=self.backend, path=self.path, prefix=prefix, request_timeout=REQUEST_TIMEOUT)

    async def lose_history(self, storage: Storage) -> int:
        """Trim the whole change log of the file behind `storage`; return the current revision."""
        if not isinstance(storage, EmbeddedStorage):
            raise TypeError(f"lose_history needs an EmbeddedStorage, got {type(storage).__name__}")
        return await storage.compact()
