"""The storage contract: what every persistent-state backend provides.

A backend is a `Storage` subclass registered under the entry-point group
``fleetkit.storage``; the entry-point name is the word users write in
``[storage] backend``. Keys are strings under the configured prefix, values are
bytes. Every successful write moves the store's revision forward, and each key
remembers the revision that created it and the one that last changed it.

Time budget: each method is one round trip to the store (a few milliseconds
on a healthy store). Backends wrap every network call in a timeout and raise
`StorageUnavailable` when the store cannot be reached, so callers may retry.

Fencing: engine writes pass a `Fence` naming the leader key and the revision at
which the writer created it. The backend applies the write only if that key
still has that create revision, in the same atomic step as the write itself,
and raises `FencingError` otherwise. A paused engine whose lease expired
therefore changes nothing when it wakes up.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One stored key with its value and revisions."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change seen by a watch; `value` is None for deletions."""

    type: EventType
    key: str
    value: bytes | None
    revision: int


@dataclass(frozen=True, slots=True)
class Fence:
    """A write guard: `key` must still exist with `create_revision`."""

    key: str
    create_revision: int


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The guarantees of a backend, which transports check at start-up."""

    linearizable_writes: bool
    native_watch: bool
    lease_ttl: bool
    multi_key_transactions: bool


class Storage(abc.ABC):
    """Abstract persistent store.

    Implementations must be safe to use from many tasks of one event loop at
    once. None of the methods retries on its own except `watch`, which resumes
    across reconnects as described there.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    # -- lifecycle ---------------------------------------------------------

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the client connection and check that the store responds.

        Raises `StorageUnavailable` naming the endpoints when it does not respond.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the client connection; pending watches end."""

    # -- reads -------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """Return the key, or None when it does not exist."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Return every key under `prefix`, sorted by key, and the store revision of that snapshot.

        The snapshot is consistent: a watch started at revision + 1 receives
        exactly the changes made after it.
        """

    # -- writes ------------------------------------------------------------

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0, fence: Fence | None = None) -> int:
        """Write the key unconditionally and return the new revision.

        Raises `FencingError` when `fence` no longer holds.
        """

    @abc.abstractmethod
    async def compare_and_swap(
        self,
        key: str,
        value: bytes,
        *,
        expected_revision: int,
        lease: int = 0,
        fence: Fence | None = None,
    ) -> int | None:
        """Write the key only if its mod revision equals `expected_revision`.

        `expected_revision=0` means the key must not exist (create). Returns
        the new revision, or None when the comparison failed (another writer
        won the race). Raises `FencingError` when `fence` no longer holds.
        """

    @abc.abstractmethod
    async def delete(self, key: str, *, expected_revision: int | None = None, fence: Fence | None = None) -> bool:
        """Delete the key; with `expected_revision`, only if it is unchanged.

        Returns True when a key was deleted, False when it was absent or the
        comparison failed. Raises `FencingError` when `fence` no longer holds.
        """

    # -- leases ------------------------------------------------------------

    @abc.abstractmethod
    async def grant_lease(self, ttl: float) -> int:
        """Create a lease of `ttl` seconds and return its id (never 0)."""

    @abc.abstractmethod
    async def refresh_lease(self, lease: int) -> float:
        """Renew the lease and return its remaining TTL in seconds.

        Raises `LeaseExpired` when the lease is gone.
        """

    @abc.abstractmethod
    async def revoke_lease(self, lease: int) -> None:
        """Revoke the lease, deleting every key attached to it. Absent leases are ignored."""

    # -- change feed -------------------------------------------------------

    @abc.abstractmethod
    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Yield batches of changes under `prefix` from `start_revision` on, in revision order.

        The iterator survives store restarts and reconnects: it resumes from
        the last revision it yielded plus one, so no change is lost or
        repeated. It raises `CompactedError` when the store no longer keeps
        the revision it must resume from; the caller then re-lists (see
        `fleetkit.core.watching.follow`).
        """

    # -- introspection -----------------------------------------------------

    def describe(self) -> str:
        """Return a one-line description for logs, without secrets."""
        return self.name
