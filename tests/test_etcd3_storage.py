"""Tests for the etcd v3 storage backend, against a real etcd."""

import asyncio
import contextlib
import logging

import aetcd
import pytest

from fleetkit.core.errors import (
    CompactedError,
    ConfigError,
    FencingError,
    LeaseExpired,
    StorageError,
    StorageUnavailable,
)
from fleetkit.core.retry import Backoff, retry
from fleetkit.core.storage import EventType, Fence
from fleetkit.plugins.etcd3 import Etcd3Storage, parse_endpoint
from fleetkit.testing.etcd import free_port


async def compact(url: str, revision: int) -> None:
    """Compact etcd's history up to `revision` with a plain aetcd client."""
    host, port = url.removeprefix("http://").split(":")
    async with aetcd.Client(host, int(port)) as client:
        await client.compact(revision, physical=True)


async def test_put_get_list_delete(etcd_storage):
    first = await etcd_storage.put("jobs/b", b"2")
    second = await etcd_storage.put("jobs/a", b"1")
    await etcd_storage.put("other", b"x")

    item = await etcd_storage.get("jobs/a")
    items, revision = await etcd_storage.list("jobs/")

    assert second > first
    assert item.key == "jobs/a"
    assert item.value == b"1"
    assert item.create_revision == item.mod_revision == second
    assert [kv.key for kv in items] == ["jobs/a", "jobs/b"]
    assert revision >= second + 1
    assert await etcd_storage.delete("jobs/a") is True
    assert await etcd_storage.delete("jobs/a") is False
    assert await etcd_storage.get("jobs/a") is None


async def test_prefix_hides_foreign_keys(etcd_server, etcd_storage):
    other = Etcd3Storage([etcd_server.client_url], prefix=etcd_storage.prefix + "nested")
    await other.connect()
    try:
        await other.put("k", b"v")
        await etcd_storage.put("mine", b"v")

        mine, _ = await etcd_storage.list("mine")
        theirs, _ = await other.list("")
    finally:
        await other.close()

    assert [kv.key for kv in mine] == ["mine"]
    assert [kv.key for kv in theirs] == ["k"]


async def test_delete_with_stale_revision_keeps_key(etcd_storage):
    created = await etcd_storage.put("k", b"1")
    await etcd_storage.put("k", b"2")

    assert await etcd_storage.delete("k", expected_revision=created) is False
    assert (await etcd_storage.get("k")).value == b"2"


async def test_cas_race_has_one_winner(etcd_storage):
    expected = 0
    for round_number in range(5):
        results = await asyncio.gather(*(
            etcd_storage.compare_and_swap("race", f"{round_number}-{writer}".encode(), expected_revision=expected)
            for writer in range(20)
        ))
        winners = [revision for revision in results if revision is not None]

        assert len(winners) == 1, f"round {round_number}: {results}"
        current = await etcd_storage.get("race")
        assert current.mod_revision == winners[0]
        expected = winners[0]


async def test_lease_expiry_deletes_keys(etcd_storage):
    lease = await etcd_storage.grant_lease(2)
    await etcd_storage.put("ephemeral", b"x", lease=lease)
    assert (await etcd_storage.get("ephemeral")).lease == lease

    async with asyncio.timeout(10):
        while await etcd_storage.get("ephemeral") is not None:
            await asyncio.sleep(0.2)

    with pytest.raises(LeaseExpired):
        await etcd_storage.refresh_lease(lease)


async def test_refresh_lease_returns_ttl(etcd_storage):
    lease = await etcd_storage.grant_lease(5)

    assert 4 <= await etcd_storage.refresh_lease(lease) <= 5


async def test_put_with_revoked_lease_raises(etcd_storage):
    lease = await etcd_storage.grant_lease(5)
    await etcd_storage.revoke_lease(lease)
    await etcd_storage.revoke_lease(lease)  # absent leases are ignored

    with pytest.raises(LeaseExpired, match="grant a new lease"):
        await etcd_storage.put("k", b"v", lease=lease)


async def test_fenced_write_rejected_after_leader_replaced(etcd_storage):
    created = await etcd_storage.put("leader", b"me")
    fence = Fence("leader", created)
    assert await etcd_storage.put("jobs/x", b"1", fence=fence) > created

    await etcd_storage.delete("leader")
    await etcd_storage.put("leader", b"successor")

    with pytest.raises(FencingError, match="no longer the leader"):
        await etcd_storage.put("jobs/x", b"2", fence=fence)
    with pytest.raises(FencingError):
        await etcd_storage.compare_and_swap("jobs/x", b"2", expected_revision=0, fence=fence)
    with pytest.raises(FencingError):
        await etcd_storage.delete("jobs/x", fence=fence)
    assert (await etcd_storage.get("jobs/x")).value == b"1"


async def test_fenced_cas_lost_race_returns_none(etcd_storage):
    fence = Fence("leader", await etcd_storage.put("leader", b"me"))
    await etcd_storage.put("jobs/x", b"1")

    assert await etcd_storage.compare_and_swap("jobs/x", b"2", expected_revision=0, fence=fence) is None


async def test_watch_starts_after_list(etcd_storage):
    await etcd_storage.put("w/before", b"0")
    _, revision = await etcd_storage.list("w/")
    await etcd_storage.put("w/after", b"1")
    await etcd_storage.delete("w/before")
    await etcd_storage.put("x/outside", b"2")

    seen = []
    async with contextlib.aclosing(etcd_storage.watch("w/", start_revision=revision + 1)) as batches:
        async with asyncio.timeout(5):
            async for batch in batches:
                seen.extend(batch)
                if len(seen) == 2:
                    break

    assert [(event.type, event.key, event.value) for event in seen] == [
        (EventType.PUT, "w/after", b"1"),
        (EventType.DELETE, "w/before", None),
    ]


async def test_watch_raises_compacted(etcd_server, etcd_storage):
    first = await etcd_storage.put("c/k", b"1")
    latest = await etcd_storage.put("c/k", b"2")
    await compact(etcd_server.client_url, latest)

    with pytest.raises(CompactedError) as caught:
        async with asyncio.timeout(5):
            async for _ in etcd_storage.watch("c/", start_revision=first):
                pass

    assert caught.value.compact_revision == latest


async def test_watch_resumes_across_etcd_kill(etcd_factory):
    server = etcd_factory()
    watcher = Etcd3Storage([server.client_url], prefix="/resume/", request_timeout=2,
                           watch_backoff=Backoff(initial=0.05, cap=0.5))
    writer = Etcd3Storage([server.client_url], prefix="/resume/", request_timeout=2)
    await watcher.connect()
    await writer.connect()
    _, start = await watcher.list("")
    events = []
    acked: list[int] = []

    async def consume() -> None:
        async for batch in watcher.watch("", start_revision=start + 1):
            events.extend(batch)

    async def write(index: int) -> None:
        revision = await retry(lambda: writer.put(f"k{index:03d}", str(index).encode()),
                               backoff=Backoff(initial=0.05, cap=0.3), deadline=30)
        acked.append(revision)

    consumer = asyncio.create_task(consume())
    try:
        for index in range(10):
            await write(index)
        server.kill()

        async def write_rest() -> None:
            for index in range(10, 30):
                await write(index)

        writing = asyncio.create_task(write_rest())
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)
        async with asyncio.timeout(30):
            await writing
            while not set(acked) <= {event.revision for event in events}:
                await asyncio.sleep(0.1)
    finally:
        consumer.cancel()
        await writer.close()
        await watcher.close()

    revisions = [event.revision for event in events]
    assert revisions == sorted(set(revisions)), "events repeated or out of order"
    assert set(acked) <= set(revisions)
    assert {event.key for event in events} == {f"k{index:03d}" for index in range(30)}


async def test_request_times_out_when_etcd_paused(etcd_factory):
    server = etcd_factory()
    storage = Etcd3Storage([server.client_url], prefix="/paused/", request_timeout=1)
    await storage.connect()
    server.pause()
    try:
        with pytest.raises(StorageUnavailable, match="timed out after 1s"):
            async with asyncio.timeout(5):
                await storage.put("k", b"v")
    finally:
        server.resume()
        await storage.close()


async def test_connect_reports_unreachable_endpoint():
    url = f"http://127.0.0.1:{free_port()}"
    storage = Etcd3Storage([url], dial_timeout=2)

    with pytest.raises(StorageUnavailable) as caught:
        await storage.connect()

    message = str(caught.value)
    assert f"etcd at {url} is unreachable (connection refused)" in message
    assert "check [storage] endpoints and that etcd is running" in message


async def test_connect_skips_dead_endpoint(etcd_server, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    storage = Etcd3Storage([dead, etcd_server.client_url], prefix="/failover/", dial_timeout=2)
    caplog.set_level(logging.INFO, logger="fleetkit.plugins.etcd3")

    await storage.connect()
    try:
        revision = await storage.put("k", b"v")
    finally:
        await storage.close()

    assert revision > 0
    assert f"connected to etcd at {etcd_server.client_url}" in caplog.text


async def test_closed_storage_rejects_requests(etcd_server):
    storage = Etcd3Storage([etcd_server.client_url], prefix="/closed/")
    await storage.connect()
    await storage.close()

    with pytest.raises(StorageError, match="call connect"):
        await storage.get("k")


async def test_close_ends_watch(etcd_server):
    storage = Etcd3Storage([etcd_server.client_url], prefix="/closing/")
    await storage.connect()
    _, revision = await storage.list("")

    async def drain() -> int:
        count = 0
        async for batch in storage.watch("", start_revision=revision + 1):
            count += len(batch)
        return count

    task = asyncio.create_task(drain())
    await storage.put("k", b"v")
    await asyncio.sleep(0.5)
    await storage.close()

    assert await asyncio.wait_for(task, 5) == 1


def test_describe_hides_password():
    storage = Etcd3Storage(["http://root:s3cret@127.0.0.1:2379", "10.0.0.2"])

    assert "s3cret" not in storage.describe()
    assert "http://root:***@127.0.0.1:2379" in storage.describe()
    assert "http://10.0.0.2:2379" in storage.describe()
    assert "s3cret" not in repr(storage.endpoints)


@pytest.mark.parametrize("text", ["http://127.0.0.1:notaport", "ftp://host", "http://:2379", "unix:///tmp/etcd.sock"])
def test_parse_endpoint_rejects_invalid(text):
    with pytest.raises(ConfigError):
        parse_endpoint(text)


def test_parse_endpoint_accepts_ipv6():
    endpoint = parse_endpoint("http://[::1]:23790")

    assert (endpoint.host, endpoint.port) == ("[::1]", 23790)
    assert endpoint.tls is False


def test_parse_endpoint_accepts_https():
    endpoint = parse_endpoint("https://root:s3cret@etcd.example:2379")

    assert endpoint.tls is True
    assert endpoint.target == "etcd.example:2379"
    assert endpoint.url == "https://root:***@etcd.example:2379"


def test_from_config_reads_section():
    class Section:
        endpoints = ["http://127.0.0.1:2379"]
        prefix = "/custom"
        dial_timeout = 1.5
        request_timeout = 2.5

    storage = Etcd3Storage.from_config(Section())

    assert storage.prefix == "/custom/"
    assert (storage.dial_timeout, storage.request_timeout) == (1.5, 2.5)
    assert storage.name == "etcd3"
