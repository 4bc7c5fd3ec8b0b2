"""Conformance tests for the change feed: order, values, crash recovery and lost history."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import pytest

from fleetkit.core.errors import CompactedError, StorageUnavailable
from fleetkit.core.retry import Backoff, retry
from fleetkit.core.storage import EventType, Storage, WatchEvent
from fleetkit.core.watching import Snapshot, follow
from fleetkit.testing.conformance_support import ConformanceBase, clients, collect_events, through, unique_prefix

if TYPE_CHECKING:
    from fleetkit.testing.conformance import StoreHarness

# Seconds the store stays down in the crash test, and writes before and during the outage.
OUTAGE = 1.0
WRITES_BEFORE_KILL = 10
WRITES_TOTAL = 30


class WatchTests(ConformanceBase):
    """Watches deliver every change once, in order, and report lost history."""

    async def test_watch_delivers_changes_in_order(self, storage: Storage) -> None:
        _, start = await storage.list("")
        expected: list[tuple[int, EventType, str, bytes | None]] = []

        async def put(key: str, value: bytes) -> None:
            expected.append((await storage.put(key, value), EventType.PUT, key, value))

        await put("w/a", b"1")
        await put("w/b", b"2")
        await storage.put("x/outside", b"not watched")
        await storage.delete("w/a")
        # delete() returns no revision; with no other writer, the store's revision is the deletion's.
        _, deleted = await storage.list("w/")
        expected.append((deleted, EventType.DELETE, "w/a", None))
        created = await storage.compare_and_swap("w/c", b"3", expected_revision=0)
        expected.append((created, EventType.PUT, "w/c", b"3"))
        await asyncio.gather(*(put(f"w/p{index}", str(index).encode()) for index in range(5)))
        await put("w/b", b"4")
        last = expected[-1][0]

        events, batches = await collect_events(storage, "w/", start_revision=start + 1, until=through(last),
                                               timeout=self.slack + 5)

        revisions = [event.revision for event in events]
        assert all(batches), "a watch yielded an empty batch"
        assert revisions == sorted(set(revisions)), f"revisions out of order or repeated: {revisions}"
        assert [(event.type, event.key, event.value) for event in events] == [
            (kind, key, value) for _, kind, key, value in sorted(expected, key=lambda item: item[0])
        ]
        puts = {revision: key for revision, kind, key, _ in expected if kind is EventType.PUT}
        assert {event.revision: event.key for event in events if event.type is EventType.PUT} == puts

    async def test_watch_resumes_after_server_kill(self, harness: StoreHarness) -> None:
        if not harness.durable:
            pytest.skip(f"the {harness.backend} store keeps no data across a crash (durable = False)")
        events: list[WatchEvent] = []
        acked: dict[int, str] = {}
        failures = 0

        async with clients(harness, unique_prefix(), 2) as (watcher, writer):
            _, start = await watcher.list("")

            async def consume() -> None:
                async for batch in watcher.watch("", start_revision=start + 1):
                    events.extend(batch)

            async def attempt(key: str) -> int:
                nonlocal failures
                try:
                    return await writer.put(key, key.encode())
                except StorageUnavailable:
                    failures += 1
                    raise

            async def write(first: int, stop: int) -> None:
                for index in range(first, stop):
                    key = f"k{index:03d}"
                    revision = await retry(lambda: attempt(key), backoff=Backoff(initial=0.05, cap=0.3),
                                           deadline=30, describe=f"put {key}")
                    acked[revision] = key

            async def all_seen() -> None:
                while not acked.keys() <= {event.revision for event in events}:
                    await asyncio.sleep(0.1)

            consumer = asyncio.create_task(consume())
            writing: asyncio.Task[None] | None = None
            try:
                async with asyncio.timeout(60):
                    await write(0, WRITES_BEFORE_KILL)
                    await harness.kill()
                    writing = asyncio.create_task(write(WRITES_BEFORE_KILL, WRITES_TOTAL))
                    await asyncio.sleep(OUTAGE)
                    await harness.restart()
                    await writing
                    await all_seen()
            finally:
                for task in (consumer, writing):
                    if task is not None:
                        task.cancel()
                await asyncio.gather(consumer, *(writing,) if writing else (), return_exceptions=True)

        revisions = [event.revision for event in events]
        assert failures > 0, "no write failed while the store was down; kill() did not stop the server"
        assert revisions == sorted(set(revisions)), f"events repeated or out of order: {revisions}"
        assert acked.keys() <= set(revisions)
        assert {event.key for event in events} == {f"k{index:03d}" for index in range(WRITES_TOTAL)}
        assert all(event.type is EventType.PUT and event.value == event.key.encode() for event in events)
        assert all(acked[event.revision] == event.key for event in events if event.revision in acked)

    async def test_watch_from_lost_history_raises_compacted(self, harness: StoreHarness, storage: Storage) -> None:
        first = await storage.put("c/k", b"1")
        await storage.put("c/k", b"2")
        latest = await storage.put("c/k", b"3")

        revision = await harness.lose_history(storage)
        with pytest.raises(CompactedError) as caught:
            async with asyncio.timeout(self.slack + 5):
                async for batch in storage.watch("c/", start_revision=first):
                    pytest.fail(f"a watch from discarded revision {first} yielded {batch!r}")
        after = await storage.put("c/k", b"4")
        events, _ = await collect_events(storage, "c/", start_revision=revision + 1, until=through(after),
                                         timeout=self.slack + 5)

        assert revision >= latest
        assert isinstance(caught.value.compact_revision, int)
        assert [(event.revision, event.value) for event in events] == [(after, b"4")]

    async def test_follow_relists_after_history_loss(self, harness: StoreHarness, storage: Storage) -> None:
        await storage.put("f/old", b"1")

        async def next_update(updates):
            async with asyncio.timeout(self.slack + 5):
                return await anext(updates)

        backoff = Backoff(initial=0.05, cap=0.5)
        async with contextlib.aclosing(follow(storage, "f/", backoff=backoff)) as updates:
            first = await next_update(updates)
            await storage.delete("f/old")
            latest = await storage.put("f/new", b"2")
            # follow() opens its watch only when asked for the next update, so
            # the history it needs is already gone when it does.
            await harness.lose_history(storage)
            second = await next_update(updates)
            newer = await storage.put("f/newer", b"3")
            batch = await next_update(updates)

        assert isinstance(first, Snapshot) and list(first.items) == ["f/old"]
        assert isinstance(second, Snapshot), f"expected a fresh snapshot after history loss, got {second!r}"
        assert {key: kv.value for key, kv in second.items.items()} == {"f/new": b"2"}
        assert second.revision >= latest
        assert [(event.key, event.revision) for event in batch] == [("f/newer", newer)]
