"""Tests for the embedded storage backend, on real SQLite files and real child processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from fleetkit.core.config import StorageConfig
from fleetkit.core.election import Election, LeaderRecord, read_leader
from fleetkit.core.errors import CompactedError, ConfigError, FencingError, LeaseExpired, StorageError
from fleetkit.core.storage import EventType, Fence
from fleetkit.core.watching import Snapshot, follow
from fleetkit.plugins.embedded import EmbeddedStorage
from fleetkit.testing.cluster import TestCluster

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock that moves only when the test calls `advance`."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def opened(path: Path, **options):
    storage = EmbeddedStorage(str(path), **options)
    await storage.connect()
    try:
        yield storage
    finally:
        await storage.close()


async def run_child(code: str, *args: str, timeout: float = 30) -> tuple[int, str]:
    """Run `code` in a fresh Python with `args`; return its exit status and combined output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(code), *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, output.decode()


async def test_put_get_list_delete(tmp_path):
    async with opened(tmp_path / "store.db") as storage:
        first = await storage.put("jobs/b", b"2")
        second = await storage.put("jobs/a", b"1")
        await storage.put("other", b"x")
        item = await storage.get("jobs/a")
        items, revision = await storage.list("jobs/")
        deleted = await storage.delete("jobs/a")
        deleted_again = await storage.delete("jobs/a")
        gone = await storage.get("jobs/a")

    assert second == first + 1
    assert (item.key, item.value, item.lease) == ("jobs/a", b"1", 0)
    assert item.create_revision == item.mod_revision == second
    assert [kv.key for kv in items] == ["jobs/a", "jobs/b"]
    assert revision == second + 1
    assert deleted is True
    assert deleted_again is False
    assert gone is None


async def test_cas_race_has_one_winner(tmp_path):
    async with opened(tmp_path / "store.db") as storage:
        expected = 0
        for round_number in range(5):
            results = await asyncio.gather(*(
                storage.compare_and_swap("race", f"{round_number}-{writer}".encode(), expected_revision=expected)
                for writer in range(20)
            ))
            winners = [revision for revision in results if revision is not None]
            assert len(winners) == 1, f"round {round_number}: {results}"
            current = await storage.get("race")
            assert current.mod_revision == winners[0]
            expected = winners[0]


async def test_fenced_write_rejected_after_fence_recreated(tmp_path):
    async with opened(tmp_path / "store.db") as storage:
        created = await storage.put("leader", b"m1")
        fence = Fence("leader", created)
        accepted = await storage.put("jobs/a", b"1", fence=fence)
        await storage.delete("leader")
        with pytest.raises(FencingError, match="no longer exists"):
            await storage.put("jobs/a", b"2", fence=fence)
        await storage.put("leader", b"m2")
        with pytest.raises(FencingError, match="re-created"):
            await storage.compare_and_swap("jobs/b", b"3", expected_revision=0, fence=fence)
        with pytest.raises(FencingError):
            await storage.delete("jobs/a", fence=fence)
        items, _ = await storage.list("jobs/")

    assert [(kv.key, kv.value, kv.mod_revision) for kv in items] == [("jobs/a", b"1", accepted)]


async def test_put_with_unknown_lease_raises(tmp_path):
    async with opened(tmp_path / "store.db") as storage:
        with pytest.raises(LeaseExpired):
            await storage.put("k", b"v", lease=12345)
        assert await storage.get("k") is None


async def test_lease_expiry_seen_by_watch(tmp_path):
    clock = FakeClock(1000.0)
    async with opened(tmp_path / "store.db", clock=clock, sweep_interval=0.05) as storage:
        lease = await storage.grant_lease(30)
        await storage.put("e/a", b"1", lease=lease)
        await storage.put("e/kept", b"2")
        _, start = await storage.list("")
        await asyncio.sleep(0.3)  # several sweeps, none of which may expire the lease
        still_there = await storage.get("e/a")

        clock.advance(31)
        batches = []
        async with asyncio.timeout(5):
            async for batch in storage.watch("e/", start_revision=start + 1):
                batches.append(batch)
                break
        with pytest.raises(LeaseExpired):
            await storage.refresh_lease(lease)

    assert still_there is not None
    assert still_there.lease == lease
    assert [[(event.type, event.key, event.value) for event in batch] for batch in batches] == [
        [(EventType.DELETE, "e/a", None)]
    ]


async def test_reopen_keeps_keys_revision_and_lease(tmp_path):
    path = tmp_path / "store.db"
    async with opened(path) as storage:
        lease = await storage.grant_lease(60)
        await storage.put("a", b"1", lease=lease)
        last = await storage.put("b", b"2")

    async with opened(path) as storage:
        items, revision = await storage.list("")
        remaining = await storage.refresh_lease(lease)
        after = await storage.put("c", b"3")

    assert [(kv.key, kv.value, kv.lease) for kv in items] == [("a", b"1", lease), ("b", b"2", 0)]
    assert revision == last
    assert remaining == 60
    assert after == last + 1


async def test_reopen_expires_lease_past_its_deadline(tmp_path):
    path = tmp_path / "store.db"
    wall = FakeClock(time.time())
    async with opened(path, wall_clock=wall) as storage:
        lease = await storage.grant_lease(5)
        await storage.put("a", b"1", lease=lease)

    wall.advance(6)  # the daemon stayed down longer than the TTL
    async with opened(path, wall_clock=wall) as storage:
        item = await storage.get("a")
        with pytest.raises(LeaseExpired):
            await storage.refresh_lease(lease)

    assert item is None


async def test_connect_rejected_while_file_locked(tmp_path):
    path = tmp_path / "store.db"
    code = """
        import asyncio, sys
        from fleetkit.core.errors import StorageError
        from fleetkit.plugins.embedded import EmbeddedStorage
        async def main():
            storage = EmbeddedStorage(sys.argv[1])
            try:
                await storage.connect()
            except StorageError as error:
                print(error)
                return 3
            await storage.close()
            print("opened")
            return 0
        sys.exit(asyncio.run(main()))
    """
    async with opened(path):
        status, output = await run_child(code, str(path))
    status_after, output_after = await run_child(code, str(path))

    assert status == 3, output
    assert str(path) in output
    assert f"in use by process {os.getpid()}" in output
    assert "stop the other fleetkit daemon" in output
    assert status_after == 0, output_after
    assert output_after.strip() == "opened"


async def test_crash_keeps_acknowledged_writes(tmp_path):
    path = tmp_path / "store.db"
    code = """
        import asyncio, sys
        from fleetkit.plugins.embedded import EmbeddedStorage
        async def main():
            storage = EmbeddedStorage(sys.argv[1])
            await storage.connect()
            for index in range(100000):
                revision = await storage.put(f"k{index:06d}", str(index).encode())
                print(index, revision, flush=True)
        asyncio.run(main())
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(code), str(path), cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )
    acknowledged: dict[str, int] = {}
    try:
        async with asyncio.timeout(60):
            while len(acknowledged) < 300:
                line = await process.stdout.readline()
                assert line, "the writer exited before it was killed"
                index, revision = line.split()
                acknowledged[f"k{int(index):06d}"] = int(revision)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async with opened(path) as storage:
        items, _ = await storage.list("k")

    stored = {kv.key: (kv.value, kv.mod_revision) for kv in items}
    assert process.returncode == -signal.SIGKILL
    missing = [key for key, revision in acknowledged.items() if stored.get(key) != (str(int(key[1:])).encode(), revision)]
    assert not missing, f"{len(missing)} acknowledged writes lost, first {missing[:5]}"


async def test_watch_from_trimmed_revision_raises_compacted(tmp_path):
    async with opened(tmp_path / "store.db", history=10) as storage:
        first = await storage.put("t/k", b"0")
        for index in range(1, 30):
            last = await storage.put("t/k", str(index).encode())

        with pytest.raises(CompactedError) as caught:
            async with asyncio.timeout(5):
                async for batch in storage.watch("t/", start_revision=first):
                    pytest.fail(f"a watch from trimmed revision {first} yielded {batch!r}")
        async with asyncio.timeout(5):
            async for batch in storage.watch("t/", start_revision=last - 5):
                kept = batch
                break

    assert first < caught.value.compact_revision < last - 5
    assert str(first) in str(caught.value)
    assert [(event.revision, event.value) for event in kept] == [(last - 5, b"24")]


async def test_follow_relists_after_compaction(tmp_path):
    async with opened(tmp_path / "store.db") as storage:
        await storage.put("f/old", b"1")
        async with contextlib.aclosing(follow(storage, "f/")) as updates:
            async with asyncio.timeout(5):
                first = await anext(updates)
                await storage.delete("f/old")
                await storage.put("f/new", b"2")
                compacted = await storage.compact()
                second = await anext(updates)

    assert isinstance(first, Snapshot)
    assert list(first.items) == ["f/old"]
    assert isinstance(second, Snapshot)
    assert second.revision == compacted
    assert {key: kv.value for key, kv in second.items.items()} == {"f/new": b"2"}


async def test_close_ends_pending_watch(tmp_path):
    storage = EmbeddedStorage(str(tmp_path / "store.db"))
    await storage.connect()
    _, revision = await storage.list("")

    async def consume() -> list:
        return [batch async for batch in storage.watch("", start_revision=revision + 1)]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    await storage.close()
    async with asyncio.timeout(5):
        batches = await task

    assert batches == []


async def test_election_two_candidates_one_leader(tmp_path):
    path = tmp_path / "store.db"
    records = [LeaderRecord(machine=name, address=f"{name}.test:7000", version="0") for name in ("m1", "m2")]
    async with opened(path) as first_store, opened(path) as second_store:
        first = Election(first_store, record=records[0], ttl=1.0)
        second = Election(second_store, record=records[1], ttl=1.0)
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(5):
                lead = await stack.enter_async_context(first.leadership())
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(2.5):  # longer than the TTL: the keep-alive must hold the lease
                    await contextlib.AsyncExitStack().enter_async_context(second.leadership())
            held = lead.is_held()
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(5):
                successor = await stack.enter_async_context(second.leadership())
            leader = await read_leader(first_store)
            with pytest.raises(FencingError):
                await first_store.put("jobs/x", b"stale", fence=lead.fence)

    assert held
    assert successor.fence.create_revision > lead.fence.create_revision
    assert leader == (records[1], successor.fence.create_revision)


async def test_connect_creates_private_directory_and_file(tmp_path):
    path = tmp_path / "state" / "nested" / "store.db"
    async with opened(path) as storage:
        await storage.put("k", b"v")
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]

    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert mode == "wal"


async def test_connect_under_regular_file_names_path(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    storage = EmbeddedStorage(str(blocker / "store.db"))

    with pytest.raises(StorageError) as caught:
        await storage.connect()

    assert str(blocker / "store.db") in str(caught.value)
    assert "writable directory" in str(caught.value)


async def test_connect_rejects_file_that_is_not_a_store(tmp_path):
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    storage = EmbeddedStorage(str(path))

    with pytest.raises(StorageError, match="not a fleetkit embedded store"):
        await storage.connect()
    await storage.close()


def test_from_config_reads_path_and_prefix(tmp_path):
    storage = EmbeddedStorage.from_config(StorageConfig(backend="embedded", path=str(tmp_path / "s.db"), prefix="/p"))

    assert (storage.path, storage.prefix) == (str(tmp_path / "s.db"), "/p/")


def test_from_config_without_path_raises():
    with pytest.raises(ConfigError, match="storage.path is empty"):
        EmbeddedStorage.from_config(StorageConfig(backend="embedded", path=""))


@pytest.mark.slow
async def test_daemon_restart_keeps_units(tmp_path):
    # Short directory: unix socket addresses are limited to 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="fk-emb-"))
    cluster = TestCluster(directory, storage_section='backend = "embedded"')
    unit = tmp_path / "hello.service"
    unit.write_text("[Service]\nExecStart=/bin/sleep 3600\n")
    daemon = """
        import sys
        from fleetkit.cli.main import main
        sys.exit(main(["daemon", "--config", sys.argv[1]]))
    """

    async def active_rows() -> list[dict]:
        listing = await cluster.cli("list-units", "--output", "json")
        return [row for row in json.loads(listing.stdout or "[]") if row["active"] == "active"]

    try:
        node = await cluster.add_node("solo")
        await cluster.start()
        started = await cluster.cli("start", "--block-timeout", "60", str(unit))
        # A second daemon on the same config must be rejected while the first runs.
        second_status, second_output = await run_child(daemon, str(node.config_path))
        await node.kill()
        await node.start()
        async with asyncio.timeout(60):  # the old leader lease (4 s) must run out first
            while not (rows := await active_rows()):
                await asyncio.sleep(0.5)
        files = sorted(path.name for path in (node.directory / "state").iterdir())
    finally:
        await cluster.close()
        shutil.rmtree(directory, ignore_errors=True)

    assert started.code == 0, started.stderr
    assert second_status != 0
    assert "is in use by process" in second_output, second_output
    assert [(row["unit"], row["machine"].split("/")[0]) for row in rows] == [("hello.service", "solo")]
    assert "store.db" in files and "store.db.lock" in files
