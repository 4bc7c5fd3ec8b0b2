"""Conformance tests for leases: expiry, refresh and revocation."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from fleetkit.core.errors import LeaseExpired
from fleetkit.core.storage import EventType, Storage, WatchEvent
from fleetkit.testing.conformance_support import ConformanceBase, collect_events, wait_until

# A lease long enough that it cannot expire during one test.
LONG_TTL = 60.0


def _deleted(keys: set[str]):
    """Return a stop condition for `collect_events`: every key in `keys` was deleted."""
    def done(events: list[WatchEvent]) -> bool:
        return keys <= {event.key for event in events if event.type is EventType.DELETE}
    return done


class LeaseTests(ConformanceBase):
    """Keys attached to a lease live exactly as long as the lease."""

    async def test_lease_expiry_deletes_keys(self, storage: Storage) -> None:
        lease = await storage.grant_lease(self.lease_ttl)
        granted = time.monotonic()
        _, start = await storage.list("")
        await storage.put("e/a", b"1", lease=lease)
        await storage.put("e/b", b"2", lease=lease)
        attached = await storage.get("e/a")

        events, _ = await collect_events(storage, "e/", start_revision=start + 1, until=_deleted({"e/a", "e/b"}),
                                         timeout=math.ceil(self.lease_ttl) + self.slack)
        took = time.monotonic() - granted

        assert attached.lease == lease
        deletions = [event for event in events if event.type is EventType.DELETE]
        assert sorted(event.key for event in deletions) == ["e/a", "e/b"]
        assert all(event.value is None for event in deletions)
        assert took >= self.lease_ttl * 0.5, f"keys deleted {took:.1f}s after granting a {self.lease_ttl:g}s lease"
        assert await storage.get("e/a") is None
        assert await storage.get("e/b") is None

    async def test_refresh_lease_keeps_keys(self, storage: Storage) -> None:
        lease = await storage.grant_lease(self.lease_ttl)
        await storage.put("kept", b"1", lease=lease)
        remaining: list[float] = []

        # Long enough that an unrenewed lease would have expired on the server.
        deadline = time.monotonic() + 1.5 * self.lease_ttl + 0.5
        async with asyncio.timeout(2 * self.lease_ttl + self.slack + 5):
            while time.monotonic() < deadline:
                await asyncio.sleep(self.lease_ttl / 4)
                remaining.append(await storage.refresh_lease(lease))

        refreshed = await storage.get("kept")
        assert refreshed is not None, f"the key expired although the lease was refreshed: {remaining}"
        assert refreshed.lease == lease
        assert all(0 < ttl <= math.ceil(self.lease_ttl) + 1 for ttl in remaining), remaining

    async def test_revoke_lease_deletes_keys(self, storage: Storage) -> None:
        lease = await storage.grant_lease(LONG_TTL)
        _, start = await storage.list("")
        await storage.put("r/a", b"1", lease=lease)
        await storage.put("r/b", b"2", lease=lease)
        await storage.put("r/unleased", b"3")

        await storage.revoke_lease(lease)
        events, _ = await collect_events(storage, "r/", start_revision=start + 1, until=_deleted({"r/a", "r/b"}),
                                         timeout=self.slack)
        await storage.revoke_lease(lease)  # revoking an absent lease is not an error

        assert {event.key for event in events if event.type is EventType.DELETE} == {"r/a", "r/b"}
        assert await storage.get("r/a") is None
        assert (await storage.get("r/unleased")).value == b"3"
        with pytest.raises(LeaseExpired):
            await storage.refresh_lease(lease)

    async def test_refresh_lease_raises_after_expiry(self, storage: Storage) -> None:
        lease = await storage.grant_lease(self.lease_ttl)
        await storage.put("doomed", b"1", lease=lease)

        async def gone() -> bool:
            return await storage.get("doomed") is None

        await wait_until(gone, timeout=math.ceil(self.lease_ttl) + self.slack, what="expiry of the lease")

        with pytest.raises(LeaseExpired):
            await storage.refresh_lease(lease)
