"""Following a key prefix: one snapshot, then every change, forever.

`follow()` turns the storage contract's list and watch calls into one stream.
The stream starts with a `Snapshot` and continues with event batches. When
the store has discarded the history that the watch needs (compaction), the
stream starts over with a fresh snapshot. `Mirror` applies the stream to a
dict.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fleetkit.core.errors import CompactedError, StorageUnavailable
from fleetkit.core.retry import Attempts, Backoff
from fleetkit.core.storage import EventType, KeyValue, Storage, WatchEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every key under the followed prefix at one store revision."""

    items: dict[str, KeyValue]
    revision: int


Update = Snapshot | list[WatchEvent]


async def _list_until_available(
    storage: Storage, prefix: str, backoff: Backoff | None
) -> tuple[list[KeyValue], int]:
    """List `prefix`, retrying with backoff while the store is unavailable.

    Logs one warning when an outage starts and one line when it ends, not one
    per attempt.
    """
    attempts = Attempts(backoff)
    warned = False
    while True:
        try:
            result = await storage.list(prefix)
        except StorageUnavailable as error:
            if not warned:
                log.warning("cannot list %r, retrying until the store is back: %s", prefix, error)
                warned = True
            await attempts.sleep()
            continue
        if warned:
            log.info("listed %r after %d failed attempts", prefix, attempts.failures)
        return result


async def follow(storage: Storage, prefix: str, *, backoff: Backoff | None = None) -> AsyncIterator[Update]:
    """Yield a `Snapshot` of `prefix`, then batches of `WatchEvent` in revision order.

    After a `CompactedError`, and after `StorageUnavailable` from a backend
    whose watch does not resume by itself, the prefix is listed again and a
    new `Snapshot` is yielded. Consumers must treat each snapshot as replacing
    all earlier state. The iterator ends when the storage's watch ends, which
    happens when the storage is closed.
    """
    while True:
        items, revision = await _list_until_available(storage, prefix, backoff)
        yield Snapshot({kv.key: kv for kv in items}, revision)
        try:
            async with contextlib.aclosing(storage.watch(prefix, start_revision=revision + 1)) as batches:
                async for batch in batches:
                    yield batch
        except CompactedError as error:
            log.info("history of %r was compacted at revision %d; listing it again",
                     prefix, error.compact_revision)
            continue
        except StorageUnavailable as error:
            log.warning("watch of %r failed, listing it again: %s", prefix, error)
            continue
        return


class Mirror:
    """A dict of key to `KeyValue` kept up to date by applying `follow()` updates.

    Keys created by a watch event get `create_revision` set to the event's
    revision, which is exact because the mirror saw every event since the
    snapshot. Watch events carry no lease, so a key written by an event keeps
    the lease of the version it replaces, or 0 when it is new.
    """

    def __init__(self) -> None:
        self.items: dict[str, KeyValue] = {}
        self.revision = 0

    def apply(self, update: Update) -> set[str]:
        """Apply a snapshot or an event batch and return the keys whose value changed or vanished."""
        if isinstance(update, Snapshot):
            return self._replace(update)
        changed: set[str] = set()
        for event in update:
            if event.revision <= self.revision:
                continue  # already contained in the snapshot
            changed.add(event.key)
            if event.type is EventType.DELETE:
                self.items.pop(event.key, None)
                continue
            previous = self.items.get(event.key)
            self.items[event.key] = KeyValue(
                key=event.key,
                value=event.value or b"",
                create_revision=previous.create_revision if previous else event.revision,
                mod_revision=event.revision,
                lease=previous.lease if previous else 0,
            )
        if update:
            self.revision = max(self.revision, update[-1].revision)
        return changed

    def _replace(self, snapshot: Snapshot) -> set[str]:
        old = self.items
        changed = set(old.keys() - snapshot.items.keys())
        changed.update(
            key for key, kv in snapshot.items.items()
            if key not in old or old[key].mod_revision != kv.mod_revision
        )
        self.items = dict(snapshot.items)
        self.revision = snapshot.revision
        return changed
