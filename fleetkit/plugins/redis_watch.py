"""Watches of the redis storage backend: reading the change stream.

Every revision of the store has at least one entry in the change stream, with
ids ``<revision>-0``, ``<revision>-1``, ... and a count of the entries of that
revision, so a watch can compute the id of the entry that must come next. It reads with
``XREAD BLOCK`` from the last entry of the last revision it finished. An entry
that is not the expected one means the entries in between were trimmed away,
and the watch raises `CompactedError`.

The watch survives reconnects and server restarts: after a failed read it
checks the store's position again and reads on from where it stopped. A
store whose revision is lower than one the watch has already seen, or whose
epoch (the time of its first write) changed, has lost data. The watch then
raises `StorageError`, because the revisions it waits for would never come.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetkit.core.errors import CompactedError, StorageError, StorageUnavailable
from fleetkit.core.retry import Attempts
from fleetkit.core.storage import EventType, WatchEvent

if TYPE_CHECKING:
    from fleetkit.plugins.redis import RedisStorage

log = logging.getLogger(__name__)

# Largest sequence part of a stream entry id: "<r>-MAX" sorts after every entry of revision r.
MAX_SEQUENCE = 2**64 - 1
# Entries per read, and the seconds a read blocks before the watch checks the store's position.
READ_COUNT = 1000
BLOCK_SECONDS = 2.0


@dataclass
class _Position:
    """Position of a watch: the next revision it needs, and the store state it last read."""

    next_revision: int
    seen_revision: int
    epoch: bytes


def _parse_id(entry_id: Any) -> tuple[int, int]:
    revision, _, sequence = bytes(entry_id).partition(b"-")
    return int(revision), int(sequence)


def _oldest_revision(oldest_id: bytes, revision: int) -> int:
    """Return the oldest revision whose changes are all still in the stream."""
    if not oldest_id:
        return revision + 1
    first, sequence = _parse_id(oldest_id)
    return first if sequence == 0 else first + 1


def _compacted(prefix: str, position: _Position, oldest: int) -> CompactedError:
    return CompactedError(
        f"watch of {prefix!r} cannot resume at revision {position.next_revision}: redis keeps changes from "
        f"revision {oldest} on only, because its change stream was trimmed; list the prefix again and watch from there",
        compact_revision=oldest - 1,
    )


async def _read_position(storage: RedisStorage, prefix: str) -> tuple[int, bytes, int]:
    """Return the store revision, its epoch and the oldest revision whose changes are all in the stream."""
    revision, epoch, oldest_id = await storage.script("POSITION", f"watch {prefix!r}", [], [])
    revision = int(revision)
    return revision, bytes(epoch), _oldest_revision(bytes(oldest_id), revision)


async def _open(storage: RedisStorage, prefix: str, start_revision: int) -> _Position:
    revision, epoch, oldest = await _read_position(storage, prefix)
    # Like etcd, a start revision of 0 means "from now on".
    position = _Position(start_revision if start_revision > 0 else revision + 1, revision, epoch)
    if position.next_revision < oldest:
        raise _compacted(prefix, position, oldest)
    return position


async def _check(storage: RedisStorage, prefix: str, position: _Position) -> None:
    """Raise StorageError when the store lost data since the watch last looked, CompactedError when trimmed."""
    revision, epoch, oldest = await _read_position(storage, prefix)
    if revision < position.seen_revision or (position.epoch and epoch != position.epoch):
        raise StorageError(
            f"redis at {storage.endpoint.url} lost data: its revision is {revision}, but the watch of {prefix!r} "
            f"already saw revision {position.seen_revision} (or the store was emptied and written again); "
            "redis was probably restarted without persistence. Enable appendonly in redis, then restart the "
            "fleetkit daemons so that they read the state again"
        )
    position.seen_revision = revision
    position.epoch = epoch
    if position.next_revision < oldest:
        raise _compacted(prefix, position, oldest)


def _event(fields: dict[bytes, bytes], revision: int) -> WatchEvent:
    key = bytes(fields[b"k"]).decode()
    if fields[b"t"] == b"delete":
        return WatchEvent(EventType.DELETE, key, None, revision)
    return WatchEvent(EventType.PUT, key, bytes(fields.get(b"v", b"")), revision)


async def _read(storage: RedisStorage, prefix: str, position: _Position) -> AsyncIterator[list[WatchEvent]]:
    """Yield the batches after `position`, one per revision with changes under `prefix`, advancing it."""
    client = storage.client()
    stream = storage.keys.changes
    read_id: bytes | str = f"{position.next_revision - 1}-{MAX_SEQUENCE}"
    expected = (position.next_revision, 0)
    pending: list[WatchEvent] = []
    block_ms = int(BLOCK_SECONDS * 1000)

    while True:
        reply = await storage.call(
            f"watch {prefix!r}",
            lambda: client.xread({stream: read_id}, count=READ_COUNT, block=block_ms),
            timeout=BLOCK_SECONDS + storage.request_timeout,
        )
        if not reply:
            await _check(storage, prefix, position)
            continue

        finished: list[tuple[int, list[WatchEvent]]] = []
        gap = False
        for entry_id, fields in reply[0][1]:
            revision, sequence = _parse_id(entry_id)
            if (revision, sequence) != expected:
                gap = True
                break
            if bytes(fields[b"k"]).decode().startswith(prefix):
                pending.append(_event(fields, revision))
            if sequence + 1 >= int(fields[b"n"]):
                finished.append((revision, pending))
                pending = []
                expected = (revision + 1, 0)
            else:
                expected = (revision, sequence + 1)
            read_id = entry_id
            position.seen_revision = max(position.seen_revision, revision)

        if not position.epoch:
            # The store was empty when the watch opened; learn its epoch now so that a restart is noticed.
            await _check(storage, prefix, position)
        for revision, batch in finished:
            if batch:
                yield batch
            position.next_revision = revision + 1
        if gap:
            await _check(storage, prefix, position)  # lost data is reported as such, not as trimming
            _, _, oldest = await _read_position(storage, prefix)
            raise _compacted(prefix, position, max(oldest, position.next_revision + 1))


async def watch_changes(storage: RedisStorage, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
    """Yield one batch per store revision with changes under `prefix`, from `start_revision` on.

    Reconnects with backoff after connection loss and resumes after the last
    revision yielded. Raises `CompactedError` when that revision was trimmed
    from the change stream and `StorageError` when the store lost data. Ends
    when the storage is closed.
    """
    storage.client()  # raises StorageError before connect()
    attempts = Attempts(storage.watch_backoff, sleep=storage.sleep_unless_closed)
    position: _Position | None = None
    outage: str | None = None
    while not storage.closed:
        try:
            if position is None:
                position = await _open(storage, prefix, start_revision)
            else:
                await _check(storage, prefix, position)
            if outage is not None:
                log.info("watch of %r resumed at revision %d", prefix, position.next_revision)
                outage = None
            async for batch in _read(storage, prefix, position):
                yield batch
                attempts.reset()
        except StorageError as error:
            if storage.closed:
                return
            if not isinstance(error, StorageUnavailable):
                raise
            if outage is None:
                log.warning("watch of %r lost redis, retrying with backoff: %s", prefix, error)
            outage = str(error)
            await attempts.sleep()
