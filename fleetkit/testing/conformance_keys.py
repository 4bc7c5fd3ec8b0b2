"""Conformance tests for keys: reads, writes, prefixes, compare-and-swap and fencing."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

import pytest

from fleetkit.core.errors import FencingError
from fleetkit.core.plugins import STORAGE, available, load_driver
from fleetkit.core.storage import Capabilities, Fence, Storage
from fleetkit.testing.conformance_support import (
    ConformanceBase,
    apply_events,
    as_dict,
    clients,
    collect_events,
    through,
    unique_prefix,
)

if TYPE_CHECKING:
    from fleetkit.testing.conformance import StoreHarness


async def _fenced_writes_rejected(storage: Storage, fence: Fence) -> None:
    """Assert that put, compare-and-swap and delete under `fence` all raise FencingError and change nothing."""
    before = await storage.get("jobs/x")
    assert before is not None

    with pytest.raises(FencingError):
        await storage.put("jobs/x", b"stale", fence=fence)
    with pytest.raises(FencingError):
        await storage.compare_and_swap("jobs/x", b"stale", expected_revision=before.mod_revision, fence=fence)
    with pytest.raises(FencingError):
        await storage.compare_and_swap("jobs/new", b"stale", expected_revision=0, fence=fence)
    with pytest.raises(FencingError):
        await storage.delete("jobs/x", fence=fence)

    assert await storage.get("jobs/x") == before
    assert await storage.get("jobs/new") is None


class KeyTests(ConformanceBase):
    """Single-key operations, listing, prefixes, races and fenced writes."""

    async def test_put_get_delete_advance_revisions(self, storage: Storage) -> None:
        first = await storage.put("jobs/b", b"2")
        second = await storage.put("jobs/a", b"1")
        third = await storage.put("other", b"x")
        created = await storage.get("jobs/a")
        updated_revision = await storage.put("jobs/a", b"1b")
        updated = await storage.get("jobs/a")
        items, list_revision = await storage.list("jobs/")

        assert first < second < third < updated_revision
        assert dataclasses.astuple(created) == ("jobs/a", b"1", second, second, 0)
        assert (updated.value, updated.create_revision, updated.mod_revision) == (b"1b", second, updated_revision)
        assert await storage.get("missing") is None
        assert [(kv.key, kv.value) for kv in items] == [("jobs/a", b"1b"), ("jobs/b", b"2")]
        assert list_revision >= updated_revision

        assert await storage.delete("jobs/a") is True
        assert await storage.get("jobs/a") is None
        assert await storage.delete("jobs/a") is False
        assert await storage.put("jobs/a", b"again") > updated_revision
        assert (await storage.get("jobs/a")).create_revision > second

    async def test_put_keeps_binary_values(self, storage: Storage) -> None:
        value = bytes(range(256))

        await storage.put("binary", value)
        await storage.put("empty", b"")

        assert (await storage.get("binary")).value == value
        assert (await storage.get("empty")).value == b""

    async def test_list_matches_watch_from_next_revision(self, storage: Storage) -> None:
        for key in ("l/k1", "l/K", "l/k07", "l/k/x", "l/k1/y"):
            await storage.put(key, key.encode())
        await storage.put("outside", b"not listed")
        halfway = asyncio.Event()
        last_revision = 0

        async def write() -> None:
            nonlocal last_revision
            for step in range(30):
                if step % 3 == 2:
                    await storage.delete(f"l/w{step - 1:02d}")
                    last_revision = await storage.put("l/marker", str(step).encode())
                else:
                    last_revision = await storage.put(f"l/w{step:02d}", str(step).encode())
                if step == 10:
                    halfway.set()

        writer = asyncio.create_task(write())
        try:
            async with asyncio.timeout(10):
                await halfway.wait()
                items, revision = await storage.list("l/")
                await writer
        finally:
            writer.cancel()
        events, _ = await collect_events(storage, "l/", start_revision=revision + 1,
                                         until=through(last_revision), timeout=self.slack + 5)
        final, _ = await storage.list("l/")

        keys = [kv.key for kv in items]
        assert keys == sorted(keys)
        assert all(kv.mod_revision <= revision for kv in items)
        assert all(event.revision > revision for event in events)
        assert apply_events(as_dict(items), events) == as_dict(final)

    async def test_prefixes_hide_each_other(self, harness: StoreHarness) -> None:
        mine = unique_prefix()
        # A sibling whose name starts with the same characters must still be separate.
        theirs = mine.rstrip("/") + "x/"
        async with clients(harness, mine, 1) as (own,), clients(harness, theirs, 1) as (other,):
            await own.put("k", b"mine")
            await other.put("k", b"theirs")
            _, start = await own.list("")
            await other.put("w", b"theirs")
            latest = await own.put("own", b"mine")
            await own.delete("k")

            events, _ = await collect_events(own, "", start_revision=start + 1, until=through(latest),
                                             timeout=self.slack + 5)
            own_items, _ = await own.list("")
            other_items, _ = await other.list("")
            other_k = await other.get("k")

        assert [event.key for event in events] == ["own"]
        assert as_dict(own_items) == {"own": b"mine"}
        assert as_dict(other_items) == {"k": b"theirs", "w": b"theirs"}
        assert other_k.value == b"theirs"

    async def test_cas_create_race_has_one_winner(self, harness: StoreHarness) -> None:
        async with clients(harness, unique_prefix(), self.writers) as writers:
            results = await asyncio.gather(*(
                writer.compare_and_swap("race", f"w{index}".encode(), expected_revision=0)
                for index, writer in enumerate(writers)
            ))
            current = await writers[0].get("race")

        winners = [(index, revision) for index, revision in enumerate(results) if revision is not None]
        assert len(winners) == 1, f"results of {self.writers} create races: {results}"
        index, revision = winners[0]
        assert (current.value, current.create_revision, current.mod_revision) == (f"w{index}".encode(), revision, revision)

    async def test_cas_update_with_stale_revision_loses(self, harness: StoreHarness) -> None:
        async with clients(harness, unique_prefix(), self.writers) as writers:
            created = await writers[0].put("race", b"v0")
            results = await asyncio.gather(*(
                writer.compare_and_swap("race", f"w{index}".encode(), expected_revision=created)
                for index, writer in enumerate(writers)
            ))
            winners = [(index, revision) for index, revision in enumerate(results) if revision is not None]
            assert len(winners) == 1, f"results of {self.writers} update races: {results}"
            index, revision = winners[0]

            stale = await writers[-1].compare_and_swap("race", b"stale", expected_revision=created)
            as_create = await writers[-1].compare_and_swap("race", b"stale", expected_revision=0)
            after_losses = await writers[-1].get("race")
            fresh = await writers[-1].compare_and_swap("race", b"fresh", expected_revision=revision)

        assert stale is None
        assert as_create is None
        assert (after_losses.value, after_losses.mod_revision) == (f"w{index}".encode(), revision)
        assert after_losses.create_revision == created
        assert fresh is not None
        assert fresh > revision

    async def test_delete_with_expected_revision_checks_it(self, storage: Storage) -> None:
        created = await storage.put("k", b"1")
        updated = await storage.put("k", b"2")

        assert await storage.delete("k", expected_revision=created) is False
        assert (await storage.get("k")).value == b"2"
        assert await storage.delete("k", expected_revision=updated) is True
        assert await storage.get("k") is None
        assert await storage.delete("k", expected_revision=updated) is False
        assert await storage.delete("absent") is False

    async def test_fenced_writes_accepted_while_fence_holds(self, harness: StoreHarness) -> None:
        async with clients(harness, unique_prefix(), 2) as (leader, other):
            fence = Fence("leader", await leader.put("leader", b"me"))
            written = await leader.put("jobs/x", b"1", fence=fence)
            swapped = await leader.compare_and_swap("jobs/x", b"2", expected_revision=written, fence=fence)
            lost = await leader.compare_and_swap("jobs/x", b"3", expected_revision=written, fence=fence)
            # Overwriting the fence key keeps its create revision, so the fence still holds.
            await other.put("leader", b"me, renewed")
            again = await leader.put("jobs/y", b"1", fence=fence)
            deleted = await leader.delete("jobs/y", fence=fence)
            current = await other.get("jobs/x")

        assert written > fence.create_revision
        assert swapped is not None
        assert swapped > written
        assert lost is None
        assert again > swapped
        assert deleted is True
        assert current.value == b"2"

    async def test_fenced_writes_rejected_after_fence_deleted(self, harness: StoreHarness) -> None:
        async with clients(harness, unique_prefix(), 2) as (leader, successor):
            fence = Fence("leader", await leader.put("leader", b"me"))
            await leader.put("jobs/x", b"1", fence=fence)
            await successor.delete("leader")

            await _fenced_writes_rejected(leader, fence)

    async def test_fenced_writes_rejected_after_fence_recreated(self, harness: StoreHarness) -> None:
        async with clients(harness, unique_prefix(), 2) as (leader, successor):
            fence = Fence("leader", await leader.put("leader", b"me"))
            await leader.put("jobs/x", b"1", fence=fence)
            await successor.delete("leader")
            recreated = await successor.put("leader", b"successor")

            assert recreated > fence.create_revision
            await _fenced_writes_rejected(leader, fence)

    async def test_capabilities_match_entry_point(self, harness: StoreHarness, storage: Storage) -> None:
        driver = load_driver(STORAGE, harness.backend)
        capabilities = type(storage).capabilities

        assert harness.backend in available(STORAGE)
        assert isinstance(storage, driver)
        assert storage.name == harness.backend
        assert isinstance(capabilities, Capabilities)
        assert all(isinstance(value, bool) for value in dataclasses.astuple(capabilities))
        assert isinstance(storage.describe(), str) and storage.describe()
