"""Conformance tests for leader election on top of the storage contract."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from fleetkit.core.election import Election, LeaderRecord, Leadership, read_leader, watch_leader
from fleetkit.core.storage import Storage
from fleetkit.testing.conformance_support import ConformanceBase, clients, unique_prefix, wait_until

if TYPE_CHECKING:
    from fleetkit.testing.conformance import StoreHarness


def _record(machine: str) -> LeaderRecord:
    return LeaderRecord(machine=machine, address=f"{machine}.test:7000", version="0")


class _Candidate:
    """One campaigning task that stays leader until `release()`."""

    def __init__(self, storage: Storage, machine: str, ttl: float):
        self.election = Election(storage, record=_record(machine), ttl=ttl)
        self.record = self.election.record
        self.elected = asyncio.Event()
        self.lead: Leadership | None = None
        self._release = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"candidate-{machine}")

    async def _run(self) -> None:
        async with self.election.leadership() as lead:
            self.lead = lead
            self.elected.set()
            await self._release.wait()

    async def wait_elected(self, timeout: float) -> float:
        """Return the seconds until elected; fail the test after `timeout` seconds."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self.elected.wait()
        except TimeoutError:
            raise AssertionError(f"{self.record.machine} not elected within {timeout:g}s") from None
        return time.monotonic() - started

    async def release(self) -> None:
        """Leave leadership (or stop campaigning) and wait for the task, within a bound."""
        self._release.set()
        if not self.elected.is_set():
            self.task.cancel()
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(self.task, return_exceptions=True)
        except TimeoutError:
            self.task.cancel()


class _LeaderLog:
    """Collects what `watch_leader` reports on one client."""

    def __init__(self, storage: Storage):
        self.seen: list[LeaderRecord | None] = []
        self.task = asyncio.create_task(self._collect(storage))

    async def _collect(self, storage: Storage) -> None:
        async with contextlib.aclosing(watch_leader(storage)) as updates:
            async for record in updates:
                self.seen.append(record)

    async def wait_for(self, record: LeaderRecord, timeout: float) -> None:
        async def reported() -> bool:
            return bool(self.seen) and self.seen[-1] == record
        await wait_until(reported, timeout=timeout, interval=0.05, what=f"watch_leader reporting {record.machine}")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class ElectionTests(ConformanceBase):
    """One leader at a time, and a quick successor when its lease ends."""

    async def test_election_elects_one_of_two(self, harness: StoreHarness) -> None:
        async with clients(harness, unique_prefix(), 3) as (first_store, second_store, observer):
            candidates = [_Candidate(first_store, "m1", self.lease_ttl), _Candidate(second_store, "m2", self.lease_ttl)]
            try:
                waits = [asyncio.create_task(candidate.elected.wait()) for candidate in candidates]
                await asyncio.wait(waits, timeout=self.slack + 5, return_when=asyncio.FIRST_COMPLETED)
                for waiting in waits:
                    waiting.cancel()
                # Longer than the TTL, so a lease that is not renewed would have ended.
                await asyncio.sleep(self.lease_ttl + 1)
                elected = [c for c in candidates if c.elected.is_set()]
                assert len(elected) == 1, f"{len(elected)} candidates lead at once"
                winner, loser = elected[0], next(c for c in candidates if c is not elected[0])
                assert winner.lead.is_held()
                assert await read_leader(observer) == (winner.record, winner.lead.fence.create_revision)

                await winner.release()
                took = await loser.wait_elected(self.slack)
                assert loser.lead.fence.create_revision > winner.lead.fence.create_revision
                assert took < self.slack
            finally:
                for candidate in candidates:
                    await candidate.release()

    async def test_election_takeover_after_lease_revoked(self, harness: StoreHarness) -> None:
        await self._check_takeover(harness, crash=False)

    async def test_election_takeover_after_lease_expiry(self, harness: StoreHarness) -> None:
        await self._check_takeover(harness, crash=True)

    async def _check_takeover(self, harness: StoreHarness, *, crash: bool) -> None:
        """Elect m1, end its lease (revoked by another client, or left to expire), and check m2 takes over.

        A crash is simulated by closing m1's client: its renewals stop and the
        lease expires on the server after the TTL.
        """
        prefix = unique_prefix()
        async with clients(harness, prefix, 2) as (second_store, observer):
            first_store = await harness.new_storage(prefix)
            first_open = True
            first = _Candidate(first_store, "m1", self.lease_ttl)
            second = None
            log = None
            try:
                await first.wait_elected(self.slack + 5)
                log = _LeaderLog(observer)
                await log.wait_for(first.record, self.slack)
                second = _Candidate(second_store, "m2", self.lease_ttl)
                await asyncio.sleep(0.2)
                assert not second.elected.is_set()

                if crash:
                    first_open = False
                    await first_store.close()
                else:
                    await observer.revoke_lease(first.lead.lease)
                took = await second.wait_elected(self.lease_ttl + self.slack)
                await log.wait_for(second.record, self.slack)
                current = await read_leader(observer)
            finally:
                for candidate in (first, second):
                    if candidate is not None:
                        await candidate.release()
                if log is not None:
                    await log.stop()
                if first_open:
                    await first_store.close()

        assert current == (second.record, second.lead.fence.create_revision)
        assert second.lead.fence.create_revision > first.lead.fence.create_revision
        assert [record for record in log.seen if record is not None] == [first.record, second.record]
        if not crash:
            assert took < self.slack, f"takeover took {took:.1f}s after the lease was revoked"
