"""Tests of the redis storage backend that the conformance suite does not cover.

Every test runs against a real redis-server started for it: credentials, TLS,
unix sockets, durability across SIGKILL, data loss, stream trimming, lease
expiry before the sweeper runs, and the generic election.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from fleetkit.core.config import StorageConfig
from fleetkit.core.election import Election, LeaderRecord
from fleetkit.core.errors import (
    CompactedError,
    ConfigError,
    FencingError,
    LeaseExpired,
    StorageError,
    StorageUnavailable,
)
from fleetkit.core.retry import Backoff
from fleetkit.core.storage import EventType, Fence
from fleetkit.core.watching import Snapshot, follow
from fleetkit.plugins.redis import RedisStorage, lex_range
from fleetkit.plugins.redis_endpoints import parse_endpoint
from fleetkit.testing.redis_harness import (  # noqa: F401 (redis_server_factory is a fixture)
    RedisServer,
    free_port,
    redis_server_factory,
    write_tls_files,
)

PASSWORD = "s3cret-Pass"


@pytest.fixture
async def connect():
    """Yield ``connect(server_or_url, **options)`` returning a connected RedisStorage; all are closed afterwards."""
    opened: list[RedisStorage] = []

    async def make(target: RedisServer | str, **options) -> RedisStorage:
        url = target if isinstance(target, str) else target.url
        options.setdefault("dial_timeout", 2.0)
        options.setdefault("request_timeout", 2.0)
        storage = RedisStorage([url], **options)
        opened.append(storage)
        await storage.connect()
        return storage

    yield make
    await asyncio.gather(*(storage.close() for storage in opened), return_exceptions=True)


async def _collect(storage: RedisStorage, prefix: str, start: int, count: int, timeout: float = 10.0) -> list:
    """Return the first `count` events of a watch of `prefix` from `start`."""
    events = []
    async with asyncio.timeout(timeout):
        async with contextlib.aclosing(storage.watch(prefix, start_revision=start)) as batches:
            async for batch in batches:
                events.extend(batch)
                if len(events) >= count:
                    return events
    return events


# -- endpoints and credentials -------------------------------------------------


def test_parse_endpoint_reads_each_form() -> None:
    tcp = parse_endpoint("redis://:pw@10.0.0.1:6380/2")
    tls = parse_endpoint("rediss://user:p%40ss@redis.example/0")
    unix = parse_endpoint("unix:///run/redis.sock?db=3")

    assert (tcp.host, tcp.port, tcp.db, tcp.password, tcp.tls) == ("10.0.0.1", 6380, 2, "pw", False)
    assert (tls.host, tls.port, tls.username, tls.password, tls.tls) == ("redis.example", 6379, "user", "p@ss", True)
    assert (unix.path, unix.db) == ("/run/redis.sock", 3)
    assert "pw" not in tcp.url
    assert "p@ss" not in tls.url
    assert "***" in tls.url


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://127.0.0.1:6379/zero", "unix://relative.sock",
                                 "redis://:pw@/0"])
def test_parse_endpoint_rejects_malformed(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_endpoint(url)

    assert "pw" not in str(caught.value)


def test_from_config_reads_storage_settings() -> None:
    config = StorageConfig(backend="redis", endpoints=("redis://127.0.0.1:7000/1",), prefix="/p", username="u",
                           password=PASSWORD, dial_timeout=1.5, request_timeout=2.5)

    storage = RedisStorage.from_config(config)

    assert (storage.prefix, storage.username, storage.dial_timeout, storage.request_timeout) == ("/p/", "u", 1.5, 2.5)
    assert storage.endpoint.db == 1
    assert PASSWORD not in storage.describe()
    assert PASSWORD not in repr(storage.endpoint)


def test_lex_range_selects_prefix() -> None:
    assert lex_range("") == (b"-", b"+")
    assert lex_range("a/") == (b"[a/", b"(a0")
    assert lex_range("\xff") == (b"[\xc3\xbf", b"(\xc3\xc0")


async def test_connect_with_wrong_password_fails_auth(redis_server_factory, connect) -> None:
    server = await redis_server_factory(password=PASSWORD)

    with pytest.raises(StorageError) as wrong:
        await connect(server, password="not-" + PASSWORD)
    with pytest.raises(StorageError) as missing:
        await connect(server)

    for caught in (wrong, missing):
        message = str(caught.value)
        assert not isinstance(caught.value, StorageUnavailable)
        assert "authentication to redis at" in message
        assert "storage.password" in message
        assert PASSWORD not in message


async def test_connect_with_url_password_succeeds(redis_server_factory, connect) -> None:
    server = await redis_server_factory(password=PASSWORD)

    storage = await connect(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0")
    revision = await storage.put("k", b"v")

    assert (await storage.get("k")).mod_revision == revision
    assert PASSWORD not in storage.describe()


async def test_connect_to_unreachable_raises_unavailable(connect) -> None:
    port = free_port()

    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as caught:
        await connect(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")

    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert "storage.endpoints" in str(caught.value)


async def test_unix_socket_endpoint_reads_and_writes(redis_server_factory, connect) -> None:
    server = await redis_server_factory(unix_socket=True)

    storage = await connect(f"unix://{server.socket_path}")
    revision = await storage.put("k", b"over unix")

    assert await storage.get("k") == (await storage.list(""))[0][0]
    assert (await storage.get("k")).mod_revision == revision


async def test_acl_user_with_documented_permissions_works(redis_server_factory, connect) -> None:
    server = await redis_server_factory(persistent=False)
    admin = server.client()
    try:
        await admin.execute_command("ACL", "SETUSER", "fleetkit", "on", f">{PASSWORD}", "~/fleetkit/*", "+@read",
                                    "+@write", "+@scripting", "+@connection", "+time")
    finally:
        await admin.aclose()

    storage = await connect(server, username="fleetkit", password=PASSWORD)
    lease = await storage.grant_lease(30)
    revision = await storage.put("k", b"v", lease=lease)
    events = await _collect(storage, "", revision, 1)
    await storage.revoke_lease(lease)
    outsider = await connect(server, username="fleetkit", password=PASSWORD, prefix="/other/")
    with pytest.raises(StorageError) as caught:
        await outsider.put("k", b"v")

    assert [event.revision for event in events] == [revision]
    assert await storage.get("k") is None
    assert not isinstance(caught.value, StorageUnavailable)
    assert "/other/*" in str(caught.value)
    assert PASSWORD not in str(caught.value)


async def test_tls_endpoint_verifies_server_with_ca_file(redis_server_factory, connect, tmp_path: Path) -> None:
    ca, cert, key, other_ca = write_tls_files(tmp_path / "tls")
    server = await redis_server_factory(tls=(cert, key, ca))

    storage = await connect(server, ca_file=str(ca))
    revision = await storage.put("k", b"over tls")
    with pytest.raises(StorageError) as caught:
        await connect(server, ca_file=str(other_ca))

    assert server.url.startswith("rediss://")
    assert (await storage.get("k")).mod_revision == revision
    assert not isinstance(caught.value, StorageUnavailable)
    assert str(other_ca) in str(caught.value)
    assert "storage.ca_file" in str(caught.value)


# -- consistency ---------------------------------------------------------------


async def test_cas_increments_from_20_clients_are_never_lost(redis_server_factory, connect) -> None:
    server = await redis_server_factory()
    storages = [await connect(server, prefix="/race/") for _ in range(20)]
    await storages[0].put("counter", b"0")
    conflicts = 0

    async def increment(storage: RedisStorage, times: int) -> None:
        nonlocal conflicts
        for _ in range(times):
            for _ in range(1000):
                current = await storage.get("counter")
                if await storage.compare_and_swap("counter", str(int(current.value) + 1).encode(),
                                                  expected_revision=current.mod_revision) is not None:
                    break
                conflicts += 1
            else:
                raise AssertionError("an increment lost 1000 races in a row")

    async with asyncio.timeout(60):
        await asyncio.gather(*(increment(storage, 10) for storage in storages))

    assert (await storages[0].get("counter")).value == b"200"
    assert conflicts > 0, "no compare-and-swap ever lost; the clients did not race"


async def test_expired_lease_keys_vanish_before_sweep(redis_server_factory, connect) -> None:
    server = await redis_server_factory()
    storage = await connect(server)
    storage._sweeper.cancel()  # only writes end the lease now
    lease = await storage.grant_lease(0.5)
    await storage.put("e/a", b"1", lease=lease)
    await storage.put("e/b", b"2", lease=lease)
    _, start = await storage.list("")

    await asyncio.sleep(0.7)
    raw = server.client()
    try:
        still_stored = await raw.exists(storage.keys.data("e/a"))
    finally:
        await raw.aclose()
    absent = (await storage.get("e/a"), await storage.list("e/"))
    written = await storage.put("e/c", b"3")
    with pytest.raises(LeaseExpired):
        await storage.refresh_lease(lease)
    with pytest.raises(LeaseExpired):
        await storage.put("e/d", b"4", lease=lease)
    events = await _collect(storage, "e/", start + 1, 3)

    assert still_stored == 1
    assert absent == (None, ([], start))
    assert [(event.type, event.key) for event in events] == [
        (EventType.DELETE, "e/a"), (EventType.DELETE, "e/b"), (EventType.PUT, "e/c")]
    assert events[0].revision == events[1].revision == written - 1


async def test_sweeper_deletes_expired_keys_promptly(redis_server_factory, connect) -> None:
    server = await redis_server_factory()
    owner, watcher = await connect(server), await connect(server)
    lease = await owner.grant_lease(1.0)
    granted = time.monotonic()
    revision = await owner.put("s/k", b"1", lease=lease)
    await owner.close()  # the lease's owner is gone; the watcher's sweeper must end it

    events = await _collect(watcher, "s/", revision + 1, 1)
    took = time.monotonic() - granted

    assert [(event.type, event.key) for event in events] == [(EventType.DELETE, "s/k")]
    assert 1.0 <= took < 1.8, f"expiry of a 1 s lease seen after {took:.2f}s"


async def test_revoke_of_many_keys_is_one_batch(redis_server_factory, connect) -> None:
    server = await redis_server_factory(persistent=False)
    storage = await connect(server)
    lease = await storage.grant_lease(60)
    keys = [f"m/{index:04d}" for index in range(1500)]  # more than one stream read
    for key in keys:
        revision = await storage.put(key, b"x", lease=lease)

    await storage.revoke_lease(lease)
    batches = []
    async with asyncio.timeout(10):
        async with contextlib.aclosing(storage.watch("m/", start_revision=revision + 1)) as stream:
            batches.append(await anext(stream))

    assert [event.key for event in batches[0]] == keys
    assert {event.revision for event in batches[0]} == {revision + 1}


async def test_fenced_write_rejected_once_leader_lease_expired(redis_server_factory, connect) -> None:
    server = await redis_server_factory()
    leader = await connect(server)
    leader._sweeper.cancel()  # the write itself must notice the expiry
    lease = await leader.grant_lease(0.3)
    fence = Fence("leader", await leader.compare_and_swap("leader", b"me", expected_revision=0, lease=lease))
    written = await leader.put("jobs/x", b"1", fence=fence)

    await asyncio.sleep(0.5)
    with pytest.raises(FencingError) as caught:
        await leader.put("jobs/x", b"stale", fence=fence)

    assert (await leader.get("jobs/x")).mod_revision == written
    assert "no longer exists" in str(caught.value)


# -- durability and history ----------------------------------------------------


async def test_watch_resumes_after_kill_without_loss(redis_server_factory, connect) -> None:
    server = await redis_server_factory()
    watcher, writer = await connect(server), await connect(server)
    _, start = await watcher.list("")
    events = []

    async def consume() -> None:
        async for batch in watcher.watch("", start_revision=start + 1):
            events.extend(batch)

    consumer = asyncio.create_task(consume())
    try:
        revisions = [await writer.put(f"k{index:03d}", b"before") for index in range(100)]
        await server.kill()
        with pytest.raises(StorageUnavailable):
            await writer.put("down", b"x")
        await server.start()
        revisions += [await writer.put(f"k{index:03d}", b"after") for index in range(100, 150)]
        async with asyncio.timeout(15):
            while len(events) < 150:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a duplicate would arrive now
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)

    assert [event.revision for event in events] == revisions == list(range(start + 1, start + 151))
    assert [event.key for event in events] == [f"k{index:03d}" for index in range(150)]
    assert len((await writer.list("k"))[0]) == 150


async def test_watch_resumes_after_server_pause(redis_server_factory, connect) -> None:
    server = await redis_server_factory(persistent=False)
    watcher, writer = await connect(server, request_timeout=1.0), await connect(server)
    before = await writer.put("p/a", b"1")
    events = []

    async def consume() -> None:
        async for batch in watcher.watch("p/", start_revision=before):
            events.extend(batch)

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.sleep(0.3)
        server.pause()
        await asyncio.sleep(4.0)  # longer than a blocking read plus the request timeout
        server.resume()
        after = await writer.put("p/b", b"2")
        async with asyncio.timeout(10):
            while len(events) < 2:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    finally:
        server.resume()
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)

    assert [(event.key, event.revision) for event in events] == [("p/a", before), ("p/b", after)]


async def test_watch_reports_store_that_lost_data(redis_server_factory, connect) -> None:
    server = await redis_server_factory(persistent=False)
    watcher, writer = await connect(server), await connect(server)
    first = await writer.put("k", b"1")
    seen = await _collect(watcher, "", first, 1)

    async def watch_on() -> None:
        async for _ in watcher.watch("", start_revision=first + 1):
            pass

    consumer = asyncio.create_task(watch_on())
    await asyncio.sleep(0.2)
    await server.kill()
    await server.start()  # empty: nothing was persisted
    with pytest.raises(StorageError) as caught:
        async with asyncio.timeout(15):
            await consumer

    assert seen[0].revision == first
    assert not isinstance(caught.value, (StorageUnavailable, CompactedError))
    assert "lost data" in str(caught.value)
    assert "appendonly" in str(caught.value)


async def test_watch_reports_lost_data_covered_by_new_writes(redis_server_factory, connect) -> None:
    server = await redis_server_factory(persistent=False)
    # The watch reconnects only after the writer has passed its old revision.
    watcher = await connect(server, watch_backoff=Backoff(initial=1.5, cap=1.5, jitter=0))
    writer = await connect(server)
    events = []

    async def consume() -> None:
        async for batch in watcher.watch("", start_revision=1):  # opened on an empty store
            events.extend(batch)

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.sleep(0.2)  # the watch opens before the first write
        for index in range(3):
            await writer.put(f"old{index}", b"1")
        async with asyncio.timeout(5):
            while len(events) < 3:
                await asyncio.sleep(0.02)
        await server.kill()
        await server.start()  # empty: nothing was persisted
        for index in range(10):  # the new revisions pass the ones the watch saw
            await writer.put(f"new{index}", b"2")
        with pytest.raises(StorageError) as caught:
            async with asyncio.timeout(15):
                await consumer
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)

    assert [event.key for event in events] == ["old0", "old1", "old2"]
    assert "lost data" in str(caught.value)


async def test_history_limit_trims_and_follow_relists(redis_server_factory, connect) -> None:
    server = await redis_server_factory(persistent=False)
    storage = await connect(server, history_limit=10)
    first = await storage.put("h/k", b"0")
    for index in range(1, 400):
        latest = await storage.put("h/k", str(index).encode())

    with pytest.raises(CompactedError) as caught:
        await _collect(storage, "h/", first + 1, 1)
    async with contextlib.aclosing(follow(storage, "h/")) as updates:
        async with asyncio.timeout(10):
            snapshot = await anext(updates)

    assert first < caught.value.compact_revision < latest
    assert isinstance(snapshot, Snapshot) and snapshot.items["h/k"].value == b"399"


async def test_watch_falling_behind_trimmed_stream_raises_compacted(redis_server_factory, connect) -> None:
    server = await redis_server_factory(persistent=False)
    storage = await connect(server, history_limit=10)
    first = await storage.put("h/k", b"0")

    async with contextlib.aclosing(storage.watch("h/", start_revision=first)) as batches:
        async with asyncio.timeout(10):
            seen = await anext(batches)
            for index in range(1, 400):  # the watch reads nothing meanwhile
                await storage.put("h/k", str(index).encode())
            with pytest.raises(CompactedError) as caught:
                await anext(batches)

    assert [event.revision for event in seen] == [first]
    assert caught.value.compact_revision > first + 1


async def test_close_ends_pending_watch(redis_server_factory, connect) -> None:
    server = await redis_server_factory(persistent=False)
    storage = await connect(server)

    async def watch_all() -> list:
        return [batch async for batch in storage.watch("", start_revision=1)]

    consumer = asyncio.create_task(watch_all())
    await asyncio.sleep(0.3)
    await storage.close()

    async with asyncio.timeout(3):
        assert await consumer == []
    with pytest.raises(StorageError):
        await storage.get("k")


# -- election ------------------------------------------------------------------


async def test_election_hands_over_and_fences_old_leader(redis_server_factory, connect) -> None:
    server = await redis_server_factory()
    first_store, second_store = await connect(server), await connect(server)
    first = Election(first_store, record=LeaderRecord("m1", "127.0.0.1:1", "t"), ttl=1.0)
    second = Election(second_store, record=LeaderRecord("m2", "127.0.0.1:2", "t"), ttl=1.0)
    elected: asyncio.Future = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def campaign() -> None:
        async with second.leadership() as lead:
            elected.set_result(lead)
            await release.wait()

    contender: asyncio.Task | None = None
    try:
        async with asyncio.timeout(20):
            async with first.leadership() as lead:
                contender = asyncio.create_task(campaign())
                await asyncio.sleep(1.5)  # renewals keep the first in office past its TTL
                held_while_contested = lead.is_held() and not elected.done()
            successor = await elected
            with pytest.raises(FencingError):
                await first_store.put("jobs/x", b"stale", fence=lead.fence)
            written = await second_store.put("jobs/x", b"fresh", fence=successor.fence)
            release.set()
            await contender
    finally:
        if contender is not None:
            contender.cancel()
            await asyncio.gather(contender, return_exceptions=True)

    assert held_while_contested
    assert successor.record.machine == "m2"
    assert successor.fence.create_revision > lead.fence.create_revision
    assert (await second_store.get("jobs/x")).mod_revision == written
    assert await second_store.get("leader") is None
