"""Shared pieces of the storage conformance suite: prefixes, waits and the base class.

The test classes in the ``conformance_*`` modules derive from
`ConformanceBase`, which contains the timing knobs and the `storage` fixture.
`fleetkit.testing.conformance` combines them into `StorageConformance`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar

import pytest
import pytest_asyncio

from fleetkit.core.storage import EventType, KeyValue, Storage, WatchEvent

if TYPE_CHECKING:
    from fleetkit.testing.conformance import StoreHarness


def unique_prefix() -> str:
    """Return a key prefix that no other test uses, such as ``/fkconf/3f2a9c01d4e5/``."""
    return f"/fkconf/{uuid.uuid4().hex[:12]}/"


async def wait_until(condition: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.1,
                     what: str = "condition") -> float:
    """Poll `condition` until it returns True and return the seconds it took.

    Raises AssertionError naming `what` when `timeout` seconds pass first.
    """
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"{what} not reached within {timeout:g}s") from None
    return time.monotonic() - started


async def collect_events(storage: Storage, prefix: str, *, start_revision: int, until: Callable[[list[WatchEvent]], bool],
                         timeout: float) -> tuple[list[WatchEvent], list[list[WatchEvent]]]:
    """Watch `prefix` from `start_revision` until `until(events)` holds.

    Returns every event seen and the batches as delivered. Raises
    AssertionError listing the events seen when `timeout` seconds pass first.
    """
    events: list[WatchEvent] = []
    batches: list[list[WatchEvent]] = []
    try:
        async with asyncio.timeout(timeout):
            async with contextlib.aclosing(storage.watch(prefix, start_revision=start_revision)) as stream:
                async for batch in stream:
                    batches.append(list(batch))
                    events.extend(batch)
                    if until(events):
                        break
    except TimeoutError:
        raise AssertionError(f"watch of {prefix!r} from revision {start_revision} stalled; saw {events!r}") from None
    return events, batches


def through(revision: int) -> Callable[[list[WatchEvent]], bool]:
    """Return a stop condition for `collect_events`: an event at `revision` or later was seen."""
    return lambda events: bool(events) and events[-1].revision >= revision


def apply_events(items: dict[str, bytes], events: list[WatchEvent]) -> dict[str, bytes]:
    """Return `items` (key to value) with `events` applied in order."""
    result = dict(items)
    for event in events:
        if event.type is EventType.DELETE:
            result.pop(event.key, None)
        else:
            assert event.value is not None, f"PUT event without a value: {event!r}"
            result[event.key] = event.value
    return result


def as_dict(items: list[KeyValue]) -> dict[str, bytes]:
    return {kv.key: kv.value for kv in items}


@contextlib.asynccontextmanager
async def clients(harness: StoreHarness, prefix: str, count: int) -> AsyncIterator[list[Storage]]:
    """Open `count` separate connected clients under `prefix`; all are closed on exit."""
    opened: list[Storage] = []
    try:
        for _ in range(count):
            opened.append(await harness.new_storage(prefix))
        yield opened
    finally:
        await asyncio.gather(*(storage.close() for storage in opened), return_exceptions=True)


class ConformanceBase:
    """Timing knobs shared by the conformance tests, and the `storage` fixture.

    A backend's test class may override the knobs. `lease_ttl` is the lease
    and election TTL in seconds (etcd's smallest is 2). `slack` is the number
    of seconds allowed beyond any bound the contract sets. `writers` is the
    number of concurrent clients in the race tests.
    """

    pytestmark = [pytest.mark.asyncio]

    lease_ttl: ClassVar[float] = 2.0
    slack: ClassVar[float] = 3.0
    writers: ClassVar[int] = 20

    @pytest_asyncio.fixture
    async def storage(self, harness: StoreHarness) -> AsyncIterator[Storage]:
        """Yield a connected client of the harness's store under a prefix unique to the test."""
        storage = await harness.new_storage(unique_prefix())
        try:
            yield storage
        finally:
            await storage.close()
