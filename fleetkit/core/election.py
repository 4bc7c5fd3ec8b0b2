"""Leader election with fencing, on top of the storage contract.

One key (``leader`` under the storage prefix) names the engine in charge.
A candidate grants a lease, then creates the key with that lease in one
compare-and-swap that only succeeds when the key is absent. The revision that
created the key becomes the `Fence` for every engine write. Once the key is
deleted or re-created, the store rejects fenced writes with `FencingError`,
even from a leader that was paused and does not yet know that it lost.

While leading, a keep-alive task renews the lease every ``ttl / 3`` seconds.
`Leadership.is_held()` also measures, on the local clock, the time since the
last renewal request that succeeded, so a process that wakes from a pause sees
that its lease may have expired before it writes anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fleetkit.core.errors import CompactedError, FencingError, LeaseExpired, StorageError
from fleetkit.core.retry import Attempts, Backoff
from fleetkit.core.storage import EventType, Fence, Storage
from fleetkit.core.watching import Snapshot, follow

log = logging.getLogger(__name__)

DEFAULT_KEY = "leader"


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    """Contents of the leader key: the leading machine, its address and its fleetkit version.

    `tls` and `plaintext` tell how the leader's transport listener accepts
    connections, so agents dial it in a way it accepts. Records written
    before listeners had TLS have neither and read as plaintext only.
    """

    machine: str
    address: str
    version: str
    tls: bool = False
    plaintext: bool = True

    def to_json(self) -> bytes:
        return json.dumps(
            {"machine": self.machine, "address": self.address, "version": self.version, "tls": self.tls,
             "plaintext": self.plaintext},
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaderRecord:
        """Parse a record written by `to_json`; raises ValueError when it is malformed."""
        try:
            fields = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"leader record is not JSON: {error}") from error
        if not isinstance(fields, dict):
            raise ValueError(f"leader record must be a JSON object, got {type(fields).__name__}")
        values = {}
        for name in ("machine", "address", "version"):
            value = fields.get(name)
            if not isinstance(value, str):
                raise ValueError(f"leader record field {name!r} must be a string, got {value!r}")
            values[name] = value
        for name, default in (("tls", False), ("plaintext", True)):
            value = fields.get(name, default)
            if not isinstance(value, bool):
                raise ValueError(f"leader record field {name!r} must be true or false, got {value!r}")
            values[name] = value
        return cls(**values)


class Leadership:
    """Proof of leadership handed out by `Election.leadership()`.

    `fence` guards every write made as leader. The renewal state is updated by
    the election's keep-alive task; nothing here blocks.
    """

    def __init__(self, *, fence: Fence, record: LeaderRecord, lease: int, ttl: float,
                 clock: Callable[[], float], renewed_at: float):
        self.fence = fence
        self.record = record
        self.lease = lease
        self.ttl = ttl
        self._clock = clock
        self._renewed_at = renewed_at
        self._lost = asyncio.Event()
        self.lost_reason: str | None = None

    def is_held(self) -> bool:
        """Return False once leadership is known lost or its lease may have expired.

        The lease may have expired when ``ttl`` seconds or more have passed on
        the local clock since the last successful renewal was sent.
        """
        if self._lost.is_set():
            return False
        if self._clock() - self._renewed_at >= self.ttl:
            self._mark_lost(f"lease not renewed for {self.ttl:g}s")
            return False
        return True

    async def wait_lost(self) -> None:
        """Return when leadership is lost: the lease expired or the leader key was deleted or changed."""
        await self._lost.wait()

    def _renewed(self, sent_at: float) -> None:
        self._renewed_at = max(self._renewed_at, sent_at)

    def _time_left(self) -> float:
        return self.ttl - (self._clock() - self._renewed_at)

    def _mark_lost(self, reason: str, level: int = logging.WARNING) -> None:
        if self._lost.is_set():
            return
        self.lost_reason = reason
        self._lost.set()
        log.log(level, "leadership of %s (fence revision %d) ended: %s",
                self.record.machine, self.fence.create_revision, reason)


class Election:
    """Campaigns for the leader key and keeps it while the caller leads.

    `ttl` is the lease time-to-live in seconds. etcd 3.4 rounds it up to whole
    seconds and to its minimum, which is 2 s with default settings. `clock`
    measures the time since the last renewal, and tests may replace it.
    """

    def __init__(self, storage: Storage, *, key: str = DEFAULT_KEY, record: LeaderRecord,
                 ttl: float, clock: Callable[[], float] = time.monotonic,
                 backoff: Backoff | None = None):
        if ttl <= 0:
            raise ValueError(f"election ttl must be positive, got {ttl}")
        self.storage = storage
        self.key = key
        self.record = record
        self.ttl = float(ttl)
        self._clock = clock
        self._backoff = backoff or Backoff(initial=0.1, cap=max(0.2, min(2.0, self.ttl / 3)))

    @contextlib.asynccontextmanager
    async def leadership(self) -> AsyncIterator[Leadership]:
        """Block until elected, then hold leadership until the block exits.

        On exit the leader key is deleted if it is still ours and the lease
        is revoked, so a successor need not wait for the TTL.
        """
        lead = await self._campaign()
        tasks = [
            asyncio.create_task(self._keep_alive(lead), name=f"election-keepalive-{self.key}"),
            asyncio.create_task(self._watch_key(lead), name=f"election-watch-{self.key}"),
        ]
        try:
            yield lead
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._resign(lead)

    # -- campaign ------------------------------------------------------------

    async def _campaign(self) -> Leadership:
        attempts = Attempts(self._backoff)
        warned = False
        while True:
            try:
                lead = await self._try_acquire()
                if lead is not None:
                    log.info("elected leader as %s (fence revision %d)", self.record.machine, lead.fence.create_revision)
                    return lead
                await self._wait_vacant()
                attempts.reset()
                warned = False
            except StorageError as error:
                if not warned:
                    log.warning("campaign for %r failed, retrying with backoff: %s", self.key, error)
                    warned = True
                await attempts.sleep()

    async def _try_acquire(self) -> Leadership | None:
        # The lease starts counting on the server after this moment, so
        # measuring from here never overestimates the time left.
        sent_at = self._clock()
        lease = await self.storage.grant_lease(self.ttl)
        revision = await self.storage.compare_and_swap(
            self.key, self.record.to_json(), expected_revision=0, lease=lease
        )
        if revision is None:
            await self._revoke_quietly(lease)
            return None
        return Leadership(
            fence=Fence(self.key, revision),
            record=self.record,
            lease=lease,
            ttl=self.ttl,
            clock=self._clock,
            renewed_at=sent_at,
        )

    async def _wait_vacant(self) -> None:
        """Return once the leader key is absent, or when the caller should look again."""
        current = await self.storage.get(self.key)
        if current is None:
            return
        log.debug("leader key %r is held (revision %d); waiting for it to be deleted", self.key, current.mod_revision)
        try:
            async with contextlib.aclosing(
                self.storage.watch(self.key, start_revision=current.mod_revision + 1)
            ) as batches:
                async for batch in batches:
                    for event in batch:
                        if event.key == self.key and event.type is EventType.DELETE:
                            return
        except CompactedError:
            return  # the caller reads the key again

    # -- holding -------------------------------------------------------------

    async def _keep_alive(self, lead: Leadership) -> None:
        """Renew the lease every ttl / 3 seconds until leadership is lost."""
        interval = self.ttl / 3
        attempts = Attempts(Backoff(initial=min(0.1, interval), cap=interval))
        delay = interval
        try:
            while True:
                # Never sleep past the moment the lease may expire.
                await asyncio.sleep(max(0.0, min(delay, lead._time_left())))
                if not lead.is_held():
                    return
                sent_at = self._clock()
                try:
                    async with asyncio.timeout(max(lead._time_left(), 0.01)):
                        await self.storage.refresh_lease(lead.lease)
                    lead._renewed(sent_at)
                    attempts.reset()
                    delay = interval
                except LeaseExpired:
                    lead._mark_lost(f"lease {lead.lease:x} expired in the store")
                    return
                except (StorageError, TimeoutError) as error:
                    delay = attempts.next_delay()
                    log.warning("renewing lease %x failed (%.1fs left): %s", lead.lease, lead._time_left(), error)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Fail safe: without renewals the lease cannot be trusted.
            log.exception("keep-alive of lease %x crashed", lead.lease)
            lead._mark_lost("keep-alive task crashed")

    async def _watch_key(self, lead: Leadership) -> None:
        """Mark leadership lost as soon as the leader key is deleted or changed."""
        try:
            async with contextlib.aclosing(follow(self.storage, self.key)) as updates:
                async for update in updates:
                    if isinstance(update, Snapshot):
                        current = update.items.get(self.key)
                        if current is None or current.create_revision != lead.fence.create_revision:
                            lead._mark_lost(f"leader key {self.key!r} was deleted or replaced")
                            return
                        continue
                    for event in update:
                        if event.key == self.key:
                            change = "deleted" if event.type is EventType.DELETE else "overwritten"
                            lead._mark_lost(f"leader key {self.key!r} was {change} at revision {event.revision}")
                            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watching leader key %r failed; relying on lease renewal alone", self.key)

    async def _resign(self, lead: Leadership) -> None:
        lead._mark_lost("resigned", logging.INFO)
        try:
            async with asyncio.timeout(max(self.ttl, 5.0)):
                with contextlib.suppress(FencingError):
                    await self.storage.delete(self.key, fence=lead.fence)
                await self.storage.revoke_lease(lead.lease)
            log.info("resigned leadership of %r", self.key)
        except (StorageError, TimeoutError) as error:
            log.warning("resigning %r failed; the lease expires within %gs: %s", self.key, self.ttl, error)

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            await self.storage.revoke_lease(lease)
        except StorageError as error:
            log.debug("revoking unused lease %x failed; it expires by itself: %s", lease, error)


async def read_leader(storage: Storage, key: str = DEFAULT_KEY) -> tuple[LeaderRecord, int] | None:
    """Return the current leader record and the revision that created its key, or None.

    Raises `StorageError` when the key contains something that is not a record.
    """
    current = await storage.get(key)
    if current is None:
        return None
    try:
        return LeaderRecord.from_json(current.value), current.create_revision
    except ValueError as error:
        raise StorageError(
            f"leader key {key!r} contains an invalid record ({error}); delete the key so that a leader is elected again"
        ) from error


def _parse_or_none(key: str, value: bytes | None) -> LeaderRecord | None:
    if value is None:
        return None
    try:
        return LeaderRecord.from_json(value)
    except ValueError as error:
        log.warning("leader key %r contains an invalid record, treating it as no leader: %s", key, error)
        return None


async def watch_leader(storage: Storage, key: str = DEFAULT_KEY) -> AsyncIterator[LeaderRecord | None]:
    """Yield the current leader (None when there is none), then each change of it.

    Consecutive duplicates are skipped, except that a deletion always shows as
    None. Store restarts and compaction are absorbed by `follow()`.
    """
    unset = object()
    last: object = unset
    async with contextlib.aclosing(follow(storage, key)) as updates:
        async for update in updates:
            if isinstance(update, Snapshot):
                current = update.items.get(key)
                values = [current.value if current else None]
            else:
                values = [event.value for event in update if event.key == key]
            for value in values:
                record = _parse_or_none(key, value)
                if record != last:
                    last = record
                    yield record
