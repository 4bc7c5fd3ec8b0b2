"""Tests for leader election and fencing, against a real etcd."""

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fleetkit.core.election import Election, LeaderRecord, read_leader, watch_leader
from fleetkit.core.errors import FencingError, StorageError
from fleetkit.plugins.etcd3 import Etcd3Storage

TTL = 2.0  # etcd 3.4 raises shorter lease TTLs to 2 s with default settings
REPO = Path(__file__).resolve().parents[1]


def record(machine: str) -> LeaderRecord:
    return LeaderRecord(machine=machine, address=f"{machine}.test:7000", version="0.1.0")


class FakeClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


async def elect(stack: contextlib.AsyncExitStack, election: Election, timeout: float):
    async with asyncio.timeout(timeout):
        return await stack.enter_async_context(election.leadership())


def test_leader_record_round_trips():
    original = record("m1")

    assert LeaderRecord.from_json(original.to_json()) == original


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"machine": "m1"}', b'{"machine": 1, "address": "a", "version": "v"}'])
def test_leader_record_rejects_malformed(data):
    with pytest.raises(ValueError):
        LeaderRecord.from_json(data)


async def test_second_candidate_waits_for_resign(etcd_storage):
    first = Election(etcd_storage, record=record("m1"), ttl=TTL)
    second = Election(etcd_storage, record=record("m2"), ttl=TTL)

    async with contextlib.AsyncExitStack() as stack:
        lead = await elect(stack, first, 5)
        with pytest.raises(TimeoutError):
            await elect(contextlib.AsyncExitStack(), second, 2 * TTL)
        assert lead.is_held(), "keep-alive should have renewed the lease"
        assert await read_leader(etcd_storage) == (record("m1"), lead.fence.create_revision)

    async with contextlib.AsyncExitStack() as stack:
        started = time.monotonic()
        successor = await elect(stack, second, 5)
        assert time.monotonic() - started < 1.0, "resigning should free the key at once"
        assert successor.record == record("m2")
        assert successor.fence.create_revision > lead.fence.create_revision
    assert await read_leader(etcd_storage) is None


async def test_takeover_after_leader_dies(etcd_server, etcd_storage):
    crashed = Etcd3Storage([etcd_server.client_url], prefix=etcd_storage.prefix, request_timeout=1)
    await crashed.connect()
    first = Election(crashed, record=record("m1"), ttl=TTL)
    second = Election(etcd_storage, record=record("m2"), ttl=TTL)

    async with contextlib.AsyncExitStack() as stack:
        old = await elect(stack, first, 5)
        # Closing the store under the leader stops its renewals, like a crash.
        await crashed.close()
        died = time.monotonic()
        async with contextlib.AsyncExitStack() as second_stack:
            new = await elect(second_stack, second, TTL + 5)
            took = time.monotonic() - died
            await asyncio.wait_for(old.wait_lost(), 1)

            assert took < TTL + 3
            assert not old.is_held()
            with pytest.raises(FencingError):
                await etcd_storage.put("jobs/x", b"stale", fence=old.fence)
            assert await etcd_storage.put("jobs/x", b"fresh", fence=new.fence) > 0


async def test_clock_jump_loses_leadership(etcd_storage):
    clock = FakeClock()
    election = Election(etcd_storage, record=record("m1"), ttl=TTL, clock=clock)

    async with contextlib.AsyncExitStack() as stack:
        lead = await elect(stack, election, 5)
        clock.offset += TTL
        await asyncio.wait_for(lead.wait_lost(), TTL)

        assert not lead.is_held()
        assert "not renewed" in lead.lost_reason


async def test_deleted_key_loses_leadership(etcd_storage):
    election = Election(etcd_storage, record=record("m1"), ttl=TTL)

    async with contextlib.AsyncExitStack() as stack:
        lead = await elect(stack, election, 5)
        await etcd_storage.delete("leader")
        await asyncio.wait_for(lead.wait_lost(), 3)

        assert not lead.is_held()
        assert "deleted" in lead.lost_reason


async def test_read_leader_rejects_garbage(etcd_storage):
    await etcd_storage.put("leader", b"garbage")

    with pytest.raises(StorageError, match="invalid record"):
        await read_leader(etcd_storage)


async def test_watch_leader_follows_changes(etcd_storage):
    seen: list = []

    async def collect() -> None:
        async for current in watch_leader(etcd_storage):
            seen.append(current)

    async def wait_for_count(count: int) -> None:
        async with asyncio.timeout(5):
            while len(seen) < count:
                await asyncio.sleep(0.05)

    task = asyncio.create_task(collect())
    try:
        await wait_for_count(1)
        expected = 1
        for machine in ("m1", "m2"):
            async with Election(etcd_storage, record=record(machine), ttl=TTL).leadership():
                expected += 1
                await wait_for_count(expected)
            expected += 1
            await wait_for_count(expected)
    finally:
        task.cancel()

    assert seen == [None, record("m1"), None, record("m2"), None]


async def test_watch_leader_survives_etcd_restart(etcd_factory):
    server = etcd_factory()
    storage = Etcd3Storage([server.client_url], prefix="/restart/", request_timeout=1)
    await storage.connect()
    seen: list = []

    async def collect() -> None:
        async for current in watch_leader(storage):
            seen.append(current)

    task = asyncio.create_task(collect())
    try:
        async with asyncio.timeout(20):
            while not seen:
                await asyncio.sleep(0.05)
            server.kill()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.start)
            async with Election(storage, record=record("m1"), ttl=TTL).leadership():
                while len(seen) < 2:
                    await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await storage.close()

    assert seen[:2] == [None, record("m1")]


PAUSED_LEADER = textwrap.dedent("""
    import asyncio, sys
    from fleetkit.core.election import Election, LeaderRecord
    from fleetkit.core.errors import FencingError
    from fleetkit.plugins.etcd3 import Etcd3Storage

    async def main(url, prefix):
        storage = Etcd3Storage([url], prefix=prefix, request_timeout=2)
        await storage.connect()
        election = Election(storage, record=LeaderRecord("paused", "paused.test:7000", "0.1.0"), ttl=2)
        async with election.leadership() as lead:
            print("LEADER", lead.fence.create_revision, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            print("HELD", lead.is_held(), flush=True)
            try:
                await storage.put("jobs/x", b"from-paused-leader", fence=lead.fence)
                print("WROTE", flush=True)
            except FencingError:
                print("FENCED", flush=True)
        await storage.close()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


async def test_paused_leader_write_is_fenced(etcd_server, etcd_storage, tmp_path):
    script = tmp_path / "paused_leader.py"
    script.write_text(PAUSED_LEADER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), etcd_server.client_url, etcd_storage.prefix,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
    )

    async def line() -> str:
        async with asyncio.timeout(15):
            return (await process.stdout.readline()).decode().strip()

    try:
        first = await line()
        assert first.startswith("LEADER"), first
        old_revision = int(first.split()[1])
        os.kill(process.pid, signal.SIGSTOP)

        candidate = Election(etcd_storage, record=record("m2"), ttl=TTL)
        async with contextlib.AsyncExitStack() as stack:
            lead = await elect(stack, candidate, TTL + 5)
            assert lead.fence.create_revision > old_revision

            os.kill(process.pid, signal.SIGCONT)
            process.stdin.write(b"go\n")
            await process.stdin.drain()

            assert await line() == "HELD False"
            assert await line() == "FENCED"
            assert await etcd_storage.get("jobs/x") is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        await process.wait()
