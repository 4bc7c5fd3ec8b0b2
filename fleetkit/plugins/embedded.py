"""The embedded storage backend: fleetkit's state in one SQLite file on this machine.

`EmbeddedStorage` needs no server. It is the backend when the config has no
``[storage]`` section, so that ``fleetkit daemon`` runs on a single machine
with nothing else installed. The file lives at ``[storage] path``, by default
``<node.state_dir>/store.db``.

Every write is one SQLite transaction that checks the fence and the compared
revision, moves the store revision forward, writes the key and appends to the
change log, and is on disk (fsync) before the call returns. Watches read the
change log and wait for an in-process signal after each commit.

Only one process may open a file; a second one gets a `StorageError` naming
the process that holds the file's lock. Clients in one process share the open
file, see `fleetkit.plugins.embedded_store`, which also translates SQLite
errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fleetkit.core.errors import ConfigError, StorageError, StorageUnavailable
from fleetkit.core.storage import Capabilities, EventType, Fence, KeyValue, Storage, WatchEvent
from fleetkit.plugins import embedded_store
from fleetkit.plugins.embedded_store import Change, Row, StoreFile

log = logging.getLogger(__name__)

DEFAULT_HISTORY = 100_000
_WATCH_WINDOW = 1000  # revisions read from the change log per query
_OUTAGE_POLL = 1.0  # seconds between checks while the file is closed under a watch


class EmbeddedStorage(Storage):
    """Storage in the SQLite file at `path`; keys are stored under `prefix`, which callers never see.

    `history` is how many revisions of the change log are kept for watches;
    a watch that starts before them raises `CompactedError`. `clock` is the
    monotonic clock that decides lease expiry. `wall_clock` gives the lease
    deadlines saved in the file. Tests may replace both clocks.
    `sweep_interval` bounds how late, in seconds, an expired lease's keys are
    deleted when nobody uses the store. `request_timeout` bounds each call.
    Clients of one path in one process share the file, and the first one to
    connect decides `history`, the clocks and the timeouts.
    """

    name = "embedded"
    capabilities = Capabilities(linearizable_writes=True, native_watch=True, lease_ttl=True, multi_key_transactions=True)

    def __init__(
        self,
        path: str,
        *,
        prefix: str = "/fleetkit/",
        history: int = DEFAULT_HISTORY,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sweep_interval: float = 0.5,
        request_timeout: float = 10.0,
    ):
        if not path:
            raise ConfigError(["storage.path is empty; set it to a file such as /var/lib/fleetkit/store.db"])
        if history < 1:
            raise ValueError(f"history must keep at least 1 revision, got {history}")
        self.path = str(path)
        self.prefix = prefix if prefix == "" or prefix.endswith("/") else prefix + "/"
        self._prefix_bytes = self.prefix.encode()
        self._options = {"history": history, "clock": clock, "wall_clock": wall_clock,
                         "sweep_interval": sweep_interval, "request_timeout": request_timeout}
        self._store: StoreFile | None = None
        self._closed = True
        self._waiters: set[asyncio.Event] = set()

    @classmethod
    def from_config(cls, storage_config: Any) -> EmbeddedStorage:
        """Build the backend from the ``[storage]`` config section (`path` and `prefix`)."""
        path = getattr(storage_config, "path", "")
        if not path:
            raise ConfigError(["storage.path is empty; set it, or set node.state_dir so that it defaults "
                               "to <node.state_dir>/store.db"])
        return cls(path, prefix=storage_config.prefix, request_timeout=storage_config.request_timeout)

    def describe(self) -> str:
        return f"embedded store at {self.path} (prefix {self.prefix!r})"

    # -- lifecycle ------------------------------------------------------------

    async def connect(self) -> None:
        """Open the file, creating it and its directory when missing.

        Raises `StorageError` when another process has the file open or the
        path cannot be created.
        """
        if self._store is not None:
            return
        self._store = await embedded_store.acquire(self.path, **self._options)
        self._closed = False

    async def close(self) -> None:
        """End pending watches and give up the file; the last client in the process closes it."""
        self._closed = True
        for event in list(self._waiters):
            event.set()
        store, self._store = self._store, None
        if store is not None:
            await embedded_store.release(store)

    async def compact(self, revision: int | None = None) -> int:
        """Drop the change log up to `revision` (default: all of it) and return the revision it now starts after.

        Watches from that revision or earlier raise `CompactedError`.
        """
        store = self._open_store("compact")
        return await store.call("compact", store.compact_sync, revision)

    def _open_store(self, action: str) -> StoreFile:
        store = self._store
        if store is None:
            raise StorageError(f"{self.describe()} is closed; call connect() before {action}")
        return store

    # -- keys -------------------------------------------------------------------

    def _full(self, key: str) -> bytes:
        return self._prefix_bytes + key.encode()

    def _fence(self, fence: Fence | None) -> tuple[bytes, int] | None:
        return None if fence is None else (self._full(fence.key), fence.create_revision)

    def _key_value(self, row: Row) -> KeyValue:
        key, value, create_revision, mod_revision, lease = row
        return KeyValue(key[len(self._prefix_bytes):].decode(), bytes(value), create_revision, mod_revision, lease)

    async def get(self, key: str) -> KeyValue | None:
        store = self._open_store(f"get {key!r}")
        row = await store.call(f"get {key!r}", store.get_sync, self._full(key))
        return None if row is None else self._key_value(row)

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        store = self._open_store(f"list {prefix!r}")
        rows, revision = await store.call(f"list {prefix!r}", store.list_sync, self._full(prefix))
        return [self._key_value(row) for row in rows], revision

    async def put(self, key: str, value: bytes, *, lease: int = 0, fence: Fence | None = None) -> int:
        action = f"put {key!r}"
        store = self._open_store(action)
        return await store.call(action, store.put_sync, action, self._full(key), bytes(value), lease,
                                self._fence(fence), None)

    async def compare_and_swap(self, key: str, value: bytes, *, expected_revision: int, lease: int = 0,
                               fence: Fence | None = None) -> int | None:
        action = f"compare-and-swap {key!r}"
        store = self._open_store(action)
        return await store.call(action, store.put_sync, action, self._full(key), bytes(value), lease,
                                self._fence(fence), expected_revision)

    async def delete(self, key: str, *, expected_revision: int | None = None, fence: Fence | None = None) -> bool:
        action = f"delete {key!r}"
        store = self._open_store(action)
        return await store.call(action, store.delete_sync, action, self._full(key), self._fence(fence),
                                expected_revision)

    # -- leases -----------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        action = f"grant lease of {ttl:g}s"
        store = self._open_store(action)
        return await store.call(action, store.grant_sync, float(ttl))

    async def refresh_lease(self, lease: int) -> float:
        action = f"refresh lease {lease:x}"
        store = self._open_store(action)
        return await store.call(action, store.refresh_sync, lease)

    async def revoke_lease(self, lease: int) -> None:
        action = f"revoke lease {lease:x}"
        store = self._open_store(action)
        await store.call(action, store.revoke_sync, lease)

    # -- watch --------------------------------------------------------------------

    def _event(self, change: Change) -> WatchEvent:
        revision, kind, key, value = change
        shown = key[len(self._prefix_bytes):].decode()
        if kind == "delete":
            return WatchEvent(EventType.DELETE, shown, None, revision)
        return WatchEvent(EventType.PUT, shown, bytes(value), revision)

    def _batches(self, changes: list[Change]) -> list[list[WatchEvent]]:
        batches: list[list[WatchEvent]] = []
        for change in changes:
            event = self._event(change)
            if batches and batches[-1][-1].revision == event.revision:
                batches[-1].append(event)
            else:
                batches.append([event])
        return batches

    async def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Yield one batch per store revision; see `Storage.watch`.

        While the file is closed under the watch (a simulated crash in tests),
        the watch polls until it reopens and resumes where it stopped. Ends when
        this client is closed.
        """
        store = self._open_store(f"watching {prefix!r}")
        full = self._full(prefix)
        next_revision = max(1, start_revision)
        wake = store.add_waiter()
        self._waiters.add(wake)
        outage = False
        try:
            while not self._closed:
                wake.clear()
                try:
                    changes, next_revision_read = await store.call(
                        f"watch {prefix!r}", store.changes_sync, prefix, full, next_revision, _WATCH_WINDOW)
                except StorageUnavailable as error:
                    if self._closed:
                        return
                    if not outage:
                        log.warning("watch of %r paused, the store is unavailable: %s", prefix, error)
                        outage = True
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_OUTAGE_POLL):
                            await wake.wait()
                    continue
                except StorageError:
                    if self._closed:
                        return
                    raise
                if outage:
                    log.info("watch of %r resumed at revision %d", prefix, next_revision)
                    outage = False
                for batch in self._batches(changes):
                    yield batch
                next_revision = next_revision_read
                if next_revision > store.revision:
                    await wake.wait()
        finally:
            self._waiters.discard(wake)
            store.remove_waiter(wake)
